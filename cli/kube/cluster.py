"""Cluster targets: `mlserve cluster add|list|remove`, and which one a command goes to."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from urllib.parse import urlsplit

from ..config import CONFIG_NAME, load_config
from ..errors import JobNotFoundError, UsageError
from ..project import NAME_RE
from ..state import StateStore
from .api import ClusterError
from .target import ClusterTarget

REGISTRY_RE = re.compile(r"[a-z0-9]([a-z0-9.-]*[a-z0-9])?(:[0-9]{1,5})?(/[a-z0-9]+([._-][a-z0-9]+)*)*")
NAMESPACE_RE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
INGRESS_CLASS_RE = NAMESPACE_RE


def chosen(flag: str | None, folder: Path | None = None) -> str | None:
    """The cluster a command goes to: ``--cluster`` (or MLSERVE_CLUSTER, which click reads into it),
    else the folder's mlserve.yml ``cluster:``; None: this machine."""
    if flag:
        return flag
    folder = folder or Path.cwd()
    if (folder / CONFIG_NAME).exists():
        return load_config(folder).cluster
    return None


def target(state: StateStore, name: str) -> ClusterTarget:
    found = state.cluster(name)
    if found is None:
        known = ", ".join(c.name for c in state.clusters())
        raise JobNotFoundError(f"no cluster named {name!r}",
                               f"Known clusters: {known}." if known else "Add one with `mlserve cluster add NAME ...`.")
    return found


def default_kubeconfig() -> Path:
    listed = os.environ.get("KUBECONFIG", "").split(os.pathsep)[0]
    return Path(listed).expanduser() if listed else Path.home() / ".kube" / "config"


def make_target(name: str, kubeconfig: Path | None, context: str | None, registry: str, namespace: str, url: str,
                ingress_class: str) -> ClusterTarget:
    """A checked target: names and addresses well formed, then the API server reached with the
    kubeconfig's credentials and the namespace usable. Raises UsageError or ClusterError."""
    if not NAME_RE.match(name):
        raise UsageError(f"{name!r} is not a valid cluster name", "1-63 lower-case letters, digits, '-' or '_'.")
    registry = registry.rstrip("/")
    if not REGISTRY_RE.fullmatch(registry):
        raise UsageError(f"--registry {registry!r} is not a registry address",
                         "e.g. registry.example.com/ml or 127.0.0.1:5000 (lower case, no scheme).")
    if not NAMESPACE_RE.fullmatch(namespace):
        raise UsageError(f"--namespace {namespace!r} is not a namespace name", "Lower-case letters, digits and '-'.")
    if not INGRESS_CLASS_RE.fullmatch(ingress_class):
        raise UsageError(f"--ingress-class {ingress_class!r} is not a class name")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path.strip("/") or parts.query \
            or parts.fragment or parts.username:
        raise UsageError(f"--url {url!r} is not the address the cluster's ingress answers at",
                         "e.g. https://models.example.com (scheme and host, an optional port, no path).")
    config = (kubeconfig or default_kubeconfig()).expanduser().resolve()
    found = ClusterTarget(name, str(config), context, registry, namespace, url.rstrip("/"), ingress_class, time.time())
    api = found.api()
    version = api.request("GET", "/version", what="ask its version").json()
    api.check_namespace()
    if not isinstance(version, dict) or not str(version.get("gitVersion", "")).startswith("v"):
        raise ClusterError(f"{api.creds.server} did not answer as a Kubernetes API server")
    return found
