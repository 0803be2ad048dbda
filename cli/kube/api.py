"""A small client of the Kubernetes API: a kubeconfig's credentials, and JSON over HTTPS with requests.

The official client takes about a second to import, longer than `status --cluster` may take in
all; mlserve needs a dozen plain REST calls. Kubeconfig support covers what clusters hand out:
tokens (also from a file), client certificates (files or data), basic auth, CA files or data, and
exec credential plugins (EKS, GKE, AKS). Every failure becomes a ClusterError that says which
cluster, what went wrong and what to do.
"""

from __future__ import annotations

import atexit
import base64
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
import yaml

from ..errors import MlserveError
from ..text import printable

TIMEOUT_S = 10.0
EXEC_TIMEOUT_S = 60

# kind -> (API prefix, resource): every kind mlserve renders, reads or deletes; all namespaced.
RESOURCES: dict[str, tuple[str, str]] = {
    "ConfigMap": ("/api/v1", "configmaps"),
    "Secret": ("/api/v1", "secrets"),
    "Service": ("/api/v1", "services"),
    "Pod": ("/api/v1", "pods"),
    "Event": ("/api/v1", "events"),
    "Deployment": ("/apis/apps/v1", "deployments"),
    "Ingress": ("/apis/networking.k8s.io/v1", "ingresses"),
    "NetworkPolicy": ("/apis/networking.k8s.io/v1", "networkpolicies"),
}


class ClusterError(MlserveError):
    """The cluster could not be reached or refused a request."""


class NotFound(ClusterError):
    pass


class Conflict(ClusterError):
    pass


@dataclass
class Credentials:
    """Where the API server is and how to prove who we are, from one context of a kubeconfig."""

    server: str
    verify: bool | str = True  # a CA bundle file, or False (insecure-skip-tls-verify)
    cert: tuple[str, str] | None = None  # client certificate and key files
    headers: dict[str, str] = field(default_factory=dict)
    auth: tuple[str, str] | None = None
    namespace: str | None = None  # the context's own namespace
    context: str = ""  # the context's name (the current one when none was asked for)


def _data_file(data: str, folder: Path, name: str) -> str:
    """A kubeconfig's *-data as a private file (requests takes files), gone when the command ends."""
    try:
        content = base64.b64decode(data, validate=True)
    except (ValueError, TypeError):
        raise ClusterError(f"the kubeconfig's {name} data is not base64") from None
    path = folder / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(content)
    return str(path)


def _named(items: object, name: str, what: str, source: Path) -> dict[str, Any]:
    for item in items if isinstance(items, list) else []:
        if isinstance(item, dict) and item.get("name") == name and isinstance(item.get(what), dict):
            return dict(item[what])
    raise ClusterError(f"the kubeconfig {source} has no {what} named {name!r}",
                       f"`kubectl config get-contexts --kubeconfig {source}` lists what it has.")


def load_credentials(kubeconfig: Path, context: str | None) -> Credentials:
    """The credentials of ``context`` (default: the kubeconfig's current context). Raises ClusterError
    with advice for a missing or unreadable file, an unknown context, or an auth method mlserve lacks."""
    try:
        config = yaml.safe_load(kubeconfig.read_text())
    except OSError as exc:
        raise ClusterError(f"cannot read the kubeconfig {kubeconfig}: {exc.strerror}",
                           "Give the file your cluster's administrator or provider gave you (--kubeconfig).") from None
    except yaml.YAMLError as exc:
        raise ClusterError(f"the kubeconfig {kubeconfig} is not YAML: {printable(str(exc))[:200]}") from None
    if not isinstance(config, dict):
        raise ClusterError(f"the kubeconfig {kubeconfig} is not a kubeconfig (no mapping at its top)")
    name = context or config.get("current-context")
    if not name:
        raise ClusterError(f"the kubeconfig {kubeconfig} names no current context", "Give one with --context NAME.")
    ctx = _named(config.get("contexts"), str(name), "context", kubeconfig)
    cluster = _named(config.get("clusters"), str(ctx.get("cluster")), "cluster", kubeconfig)
    user = _named(config.get("users"), str(ctx.get("user")), "user", kubeconfig) if ctx.get("user") else {}
    server = str(cluster.get("server") or "").rstrip("/")
    if not server.startswith(("https://", "http://")):
        raise ClusterError(f"the kubeconfig's cluster {ctx.get('cluster')!r} has no http(s):// server address")
    folder = Path(tempfile.mkdtemp(prefix="mlserve-kube-"))  # data turned into files for requests; private (0700)
    atexit.register(shutil.rmtree, folder, True)
    base = kubeconfig.parent
    creds = Credentials(server, namespace=ctx.get("namespace"), context=str(name))
    if cluster.get("insecure-skip-tls-verify"):
        creds.verify = False
    elif cluster.get("certificate-authority-data"):
        creds.verify = _data_file(cluster["certificate-authority-data"], folder, "ca.crt")
    elif cluster.get("certificate-authority"):
        creds.verify = str(base / cluster["certificate-authority"])
    cert = user.get("client-certificate-data") and _data_file(user["client-certificate-data"], folder, "client.crt")
    cert = cert or (user.get("client-certificate") and str(base / user["client-certificate"]))
    key = user.get("client-key-data") and _data_file(user["client-key-data"], folder, "client.key")
    key = key or (user.get("client-key") and str(base / user["client-key"]))
    if cert and key:
        creds.cert = (cert, key)
    token = user.get("token")
    if not token and user.get("tokenFile"):
        try:
            token = Path(base / user["tokenFile"]).read_text().strip()
        except OSError as exc:
            raise ClusterError(f"cannot read the kubeconfig's tokenFile: {exc.strerror}") from None
    if not token and isinstance(user.get("exec"), dict):
        token = _exec_token(user["exec"], server)
    if user.get("auth-provider"):
        raise ClusterError("the kubeconfig's user authenticates with an auth-provider plugin, which mlserve does not run",
                           "Use a context whose user has a token, a client certificate or an exec plugin.")
    if token:
        creds.headers["Authorization"] = f"Bearer {token}"
    elif user.get("username") and user.get("password"):
        creds.auth = (str(user["username"]), str(user["password"]))
    return creds


def _exec_token(spec: Mapping[str, Any], server: str) -> str:
    """Run a client.authentication.k8s.io exec plugin (as kubectl does) and take its token."""
    command = [str(spec.get("command") or "")] + [str(a) for a in spec.get("args") or []]
    env = {**os.environ, **{str(e["name"]): str(e["value"]) for e in spec.get("env") or [] if isinstance(e, dict)}}
    env["KUBERNETES_EXEC_INFO"] = json.dumps({"apiVersion": spec.get("apiVersion"), "kind": "ExecCredential",
                                              "spec": {"cluster": {"server": server}, "interactive": False}})
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=EXEC_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ClusterError(f"the kubeconfig's credential plugin {command[0]!r} did not run: {exc}") from None
    if done.returncode != 0:
        raise ClusterError(f"the kubeconfig's credential plugin {command[0]!r} failed (exit {done.returncode})",
                           printable(done.stderr.strip())[-500:] or None)
    try:
        token = json.loads(done.stdout)["status"]["token"]
    except (ValueError, KeyError, TypeError):
        raise ClusterError(f"the credential plugin {command[0]!r} gave no token") from None
    return str(token)


class Api:
    """JSON requests to one namespace of one cluster, with errors in words."""

    def __init__(self, creds: Credentials, namespace: str, cluster: str) -> None:
        self.creds = creds
        self.namespace = namespace
        self.cluster = cluster  # the name `cluster add` gave it, for messages
        self.session = requests.Session()
        self.session.cert = creds.cert
        self.session.auth = creds.auth
        self.session.headers.update(creds.headers)

    def path(self, kind: str, name: str | None = None, sub: str | None = None) -> str:
        prefix, resource = RESOURCES[kind]
        path = f"{prefix}/namespaces/{self.namespace}/{resource}"
        return path + (f"/{name}" if name else "") + (f"/{sub}" if sub else "")

    def request(self, method: str, path: str, body: Any = None, params: Mapping[str, Any] | None = None,
                what: str = "", stream: bool = False, timeout: float | None = TIMEOUT_S) -> requests.Response:
        url = self.creds.server + path
        try:
            # verify per request: a session's is overridden by REQUESTS_CA_BUNDLE from the environment.
            response = self.session.request(method, url, json=body, params=params, stream=stream, timeout=timeout,
                                            headers={"Accept": "application/json"}, verify=self.creds.verify)
        except requests.exceptions.SSLError as exc:
            raise ClusterError(f"cluster {self.cluster}: the API server's certificate is not trusted ({_short(exc)})",
                               "Check the kubeconfig's certificate-authority for this cluster.") from None
        except requests.RequestException as exc:
            raise ClusterError(f"cluster {self.cluster}: the API server at {self.creds.server} does not answer "
                               f"({_short(exc)})",
                               "Check that the cluster runs and that this machine reaches it (VPN, firewall).") from None
        if response.status_code < 400:
            return response
        message = _status_message(response)
        doing = f" ({what})" if what else ""
        if response.status_code == 401:
            raise ClusterError(f"cluster {self.cluster}: the API server does not accept the kubeconfig's "
                               f"credentials{doing}", "Get fresh credentials for this context, or `mlserve cluster "
                               "add` it again with another --context.")
        if response.status_code == 403:
            raise ClusterError(f"cluster {self.cluster}: no permission{doing}: {message}",
                               f"Ask for a Role in namespace {self.namespace} that allows it, or use another --namespace.")
        if response.status_code == 404:
            raise NotFound(f"cluster {self.cluster}: not found{doing}: {message}")
        if response.status_code == 409:
            raise Conflict(f"cluster {self.cluster}: conflict{doing}: {message}")
        raise ClusterError(f"cluster {self.cluster}: the API server refused{doing} (HTTP {response.status_code}): {message}")

    # objects -----------------------------------------------------------------------------------

    def get(self, kind: str, name: str) -> dict[str, Any] | None:
        try:
            return dict(self.request("GET", self.path(kind, name), what=f"read {kind} {name}").json())
        except NotFound:
            return None

    def list(self, kind: str, selector: str) -> list[dict[str, Any]]:
        """Every object of ``kind`` with these labels, in one call."""
        data = self.request("GET", self.path(kind), params={"labelSelector": selector},
                            what=f"list {RESOURCES[kind][1]}").json()
        return list(data.get("items") or [])

    def create(self, body: dict[str, Any]) -> dict[str, Any]:
        kind, name = body["kind"], body["metadata"]["name"]
        return dict(self.request("POST", self.path(kind), body, what=f"create {kind} {name}").json())

    def replace(self, body: dict[str, Any], resource_version: str) -> dict[str, Any]:
        kind, name = body["kind"], body["metadata"]["name"]
        body = {**body, "metadata": {**body["metadata"], "resourceVersion": resource_version}}
        return dict(self.request("PUT", self.path(kind, name), body, what=f"update {kind} {name}").json())

    def delete(self, kind: str, name: str) -> bool:
        """Delete one object (its pods go in the background); False when it was gone already."""
        try:
            self.request("DELETE", self.path(kind, name), {"propagationPolicy": "Background"},
                         what=f"delete {kind} {name}")
        except NotFound:
            return False
        return True

    def check_namespace(self) -> None:
        """Fail now, with advice, when the namespace cannot be used: listing ConfigMaps there is the
        least any command needs (a list in a namespace that does not exist answers empty, so the
        namespace itself is asked for too, where the credentials may read it)."""
        self.request("GET", self.path("ConfigMap"), params={"limit": 1}, what=f"list configmaps in {self.namespace}")
        try:
            self.request("GET", f"/api/v1/namespaces/{self.namespace}", what=f"read namespace {self.namespace}")
        except NotFound:
            raise ClusterError(f"cluster {self.cluster}: there is no namespace {self.namespace}",
                               f"Create it (`kubectl create namespace {self.namespace}`) or give another --namespace.") from None
        except ClusterError as exc:
            if "no permission" not in exc.message:  # a Role in one namespace may not read namespaces: fine
                raise

    def log_lines(self, pod: str, follow: bool, tail: int | None) -> Iterator[str]:
        params: dict[str, Any] = {"container": "app", "follow": "true" if follow else "false"}
        if tail:
            params["tailLines"] = tail
        response = self.request("GET", self.path("Pod", pod, "log"), params=params, what=f"read the log of pod {pod}",
                                stream=True, timeout=None if follow else TIMEOUT_S)
        for line in response.iter_lines(decode_unicode=False):
            yield line.decode("utf-8", "replace")


def _short(exc: Exception) -> str:
    """The innermost reason of a requests error (they nest: "Max retries ... (Caused by ...(reason))")."""
    text = str(exc)
    for marker in ("Caused by ", "certificate verify failed: "):
        if marker in text:
            text = text[text.rindex(marker) + len(marker):]
    return printable(text.strip("()'\" ").split("'))")[0])[:160]


def _status_message(response: requests.Response) -> str:
    try:
        return printable(str(response.json().get("message") or ""))[:300]
    except ValueError:
        return printable(response.text[:200])
