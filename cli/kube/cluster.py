"""Cluster targets: `mlserve cluster add|list|remove`, and which one a command goes to."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from ..config import CONFIG_NAME
from ..errors import JobNotFoundError, UsageError
from ..project import NAME_RE
from ..state import StateStore
from .api import Api, ClusterError, load_credentials
from .target import ClusterTarget

REGISTRY_RE = re.compile(r"[a-z0-9]([a-z0-9.-]*[a-z0-9])?(:[0-9]{1,5})?(/[a-z0-9]+([._-][a-z0-9]+)*)*")
NAMESPACE_RE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
INGRESS_CLASS_RE = NAMESPACE_RE


def chosen(flag: str | None, folder: Path | None = None) -> tuple[str | None, bool]:
    """The cluster a command goes to, and whether only the folder's mlserve.yml named it: ``--cluster``
    (or MLSERVE_CLUSTER, which click reads into it; an empty one means this machine), else mlserve.yml's
    ``cluster:``; None: this machine. Only that key is read here: a command that does not deploy
    does not fail on the rest of a broken mlserve.yml."""
    if flag is not None:
        return flag or None, False
    path = (folder or Path.cwd()) / CONFIG_NAME
    try:
        raw = yaml.safe_load(path.read_text()) if path.is_file() and not path.is_symlink() else None
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return None, False
    name = raw.get("cluster") if isinstance(raw, dict) else None
    return (name, True) if isinstance(name, str) and name else (None, False)


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


def make_target(name: str, kubeconfig: Path | None, context: str | None, registry: str, namespace: str | None,
                url: str, ingress_class: str) -> ClusterTarget:
    """A checked target: names and addresses well formed, then the API server reached with the
    kubeconfig's credentials and the namespace usable. Raises UsageError or ClusterError."""
    if not NAME_RE.match(name):
        raise UsageError(f"{name!r} is not a valid cluster name", "1-63 lower-case letters, digits, '-' or '_'.")
    registry = registry.rstrip("/")
    if not REGISTRY_RE.fullmatch(registry):
        raise UsageError(f"--registry {registry!r} is not a registry address",
                         "e.g. registry.example.com/ml or 127.0.0.1:5000 (lower case, no scheme).")
    if namespace is not None and not NAMESPACE_RE.fullmatch(namespace):
        raise UsageError(f"--namespace {namespace!r} is not a namespace name", "Lower-case letters, digits and '-'.")
    if not INGRESS_CLASS_RE.fullmatch(ingress_class):
        raise UsageError(f"--ingress-class {ingress_class!r} is not a class name")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path.strip("/") or parts.query \
            or parts.fragment or parts.username:
        raise UsageError(f"--url {url!r} is not the address the cluster's ingress answers at",
                         "e.g. https://models.example.com (scheme and host, an optional port, no path).")
    config = (kubeconfig or default_kubeconfig()).expanduser().resolve()
    # The context is recorded by name: a later `kubectl config use-context` must not move the target.
    creds = load_credentials(config, context)
    namespace = namespace or creds.namespace or "default"
    if not NAMESPACE_RE.fullmatch(namespace):
        raise UsageError(f"the context's namespace {namespace!r} is not a namespace name", "Give --namespace.")
    found = ClusterTarget(name, str(config), creds.context, registry, namespace, url.rstrip("/"), ingress_class,
                          time.time())
    api = Api(creds, namespace, name)
    version = api.request("GET", "/version", what="ask its version").json()
    api.check_namespace()
    if not isinstance(version, dict) or not str(version.get("gitVersion", "")).startswith("v"):
        raise ClusterError(f"{api.creds.server} did not answer as a Kubernetes API server")
    return found
