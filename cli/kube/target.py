"""A cluster target as `mlserve cluster add` records it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit


@dataclass(frozen=True)
class ClusterTarget:
    name: str
    kubeconfig: str  # absolute path
    context: str | None  # None: the kubeconfig's current context
    registry: str  # host[:port]/path images are pushed to and pulled from
    namespace: str
    url: str  # scheme://host[:port] the cluster's ingress answers at; endpoints start with it
    ingress_class: str = "nginx"
    created_at: float = 0.0

    @property
    def host(self) -> str | None:
        """The Ingress rules' host: the URL's, unless it is an address (rules then match any host)."""
        host = urlsplit(self.url).hostname or ""
        return None if not host or host.replace(".", "").isdigit() or ":" in host else host

    def api(self):  # -> Api; imported here so listing targets never loads requests
        from .api import Api, load_credentials

        creds = load_credentials(Path(self.kubeconfig), self.context)
        return Api(creds, self.namespace, self.name)
