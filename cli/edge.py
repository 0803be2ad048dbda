"""Opening the gateway to the network: where it listens, its TLS, its public URL, and the rule that a
project open to anyone is only served beyond loopback when the user said so (--allow-unauthenticated,
Cloud Run's word for it).
"""

from __future__ import annotations

import ipaddress
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from . import tls
from .errors import MlserveError, UsageError
from .guard import Guard
from .platform import Platform
from .routing import Router

ALLOW_UNAUTHENTICATED = "gateway.allow_unauthenticated"
TLS_MODES = ("self-signed", "off")
SETTINGS = ("gateway.host", "gateway.port", "gateway.body_limit_mb", "gateway.timeout_s", "gateway.tls",
            "gateway.public_url", ALLOW_UNAUTHENTICATED)


@dataclass(frozen=True)
class GatewayOptions:
    """`gateway start`'s flags; None keeps what the gateway had."""

    host: str | None = None
    port: int | None = None
    body_limit_mb: int | None = None
    timeout_s: int | None = None
    public_url: str | None = None  # "" forgets it
    tls: str | None = None  # self-signed | off
    tls_cert: Path | None = None
    tls_key: Path | None = None
    allow_unauthenticated: bool = False


@dataclass(frozen=True)
class GatewayStarted:
    url: str
    ca_file: str | None  # the CA clients trust for a self-signed certificate
    loopback: bool
    tls: bool


def check_open_to_anyone(platform: Platform, guards: Iterable[tuple[str, Guard]], host: str | None = None,
                         allowed: bool | None = None) -> None:
    """Refuse to serve a project that says `access: public` on a gateway open to the network, unless the
    user allowed it. ``host``/``allowed`` are the gateway's to be; by default, its current ones.
    Raises UsageError naming the projects."""
    settings = platform.gateway.settings
    loopback = ipaddress.ip_address(host or settings.host).is_loopback
    if allowed is None:
        allowed = platform.state.get_setting(ALLOW_UNAUTHENTICATED) is not None
    public = sorted(key for key, guard in guards if guard.access == "public")
    if loopback or allowed or not public:
        return
    raise UsageError(
        f"{', '.join(public)} {'is' if len(public) == 1 else 'are'} open to anyone (access: public), and the "
        f"gateway {'would listen' if host else 'listens'} on {host or settings.host}, beyond this machine",
        "Require tokens (`access: token` in mlserve.yml, `mlserve run --access token`, or `mlserve access token "
        "--project P`), or let anyone on the network call them: `mlserve gateway start --allow-unauthenticated`.",
    )


def project_guards(platform: Platform) -> list[tuple[str, Guard]]:
    """Every project on record with its guard."""
    guards = []
    for key in platform.state.projects():
        owner, _, project = key.split("/", 2)
        guards.append((key, platform.state.guard(owner, project)))
    return guards


def start_gateway(platform: Platform, options: GatewayOptions) -> GatewayStarted:
    """Change the gateway's settings and start (or reload) it. A gateway that cannot start keeps its old
    settings. Raises UsageError for a bad flag, GatewayError when nginx refuses."""
    state, current = platform.state, platform.gateway.settings
    host = _host(options.host) if options.host is not None else current.host
    loopback = ipaddress.ip_address(host).is_loopback
    if options.tls is not None and (options.tls_cert or options.tls_key):
        raise UsageError("give either --tls self-signed|off or --tls-cert and --tls-key, not both")
    if bool(options.tls_cert) != bool(options.tls_key):
        raise UsageError("--tls-cert and --tls-key go together")
    tls_on = current.tls if options.tls is None and not options.tls_cert else options.tls != "off"
    public_url = current.public_url if options.public_url is None else (_public_url(options.public_url) or None)
    if not loopback and not tls_on:
        raise UsageError(
            f"the gateway would listen on {host}, beyond this machine, without TLS",
            "Add `--tls self-signed` (a certificate for this machine, its CA file printed for clients) or "
            "`--tls-cert FILE --tls-key FILE`. Behind a proxy that speaks TLS, listen on 127.0.0.1 and give "
            "--public-url.")
    # Allowing anyone is a statement about this opening: a new --host without the flag takes it back.
    allowed = options.allow_unauthenticated or (options.host is None and state.get_setting(ALLOW_UNAUTHENTICATED) is not None)
    changes = {
        "gateway.host": host, "gateway.port": options.port, "gateway.body_limit_mb": options.body_limit_mb,
        "gateway.timeout_s": options.timeout_s, "gateway.tls": "1" if tls_on else "",
        "gateway.public_url": public_url or "", ALLOW_UNAUTHENTICATED: "1" if allowed else "",
    }
    with state.lock():
        check_open_to_anyone(platform, project_guards(platform), host, allowed)
        before = {key: state.get_setting(key) for key in SETTINGS}
        try:
            ca = _certificate(platform, options, host, public_url) if tls_on else None
            for key, value in changes.items():
                if value is None:
                    continue
                if value == "":
                    state.delete_setting(key)
                else:
                    state.set_setting(key, str(value))
            platform.forget_gateway()  # made again from the new settings
            Router(platform).apply(start=True)
        except MlserveError:
            for key, old in before.items():
                if old is None:
                    state.delete_setting(key)
                else:
                    state.set_setting(key, old)
            platform.forget_gateway()
            raise
    return GatewayStarted(platform.gateway.url, str(ca) if ca else None, loopback, tls_on)


def _certificate(platform: Platform, options: GatewayOptions, host: str, public_url: str | None) -> Path | None:
    gateway_dir = platform.home.gateway_dir
    if options.tls_cert and options.tls_key:
        return tls.install_files(gateway_dir, options.tls_cert, options.tls_key).ca
    installed = tls.installed(gateway_dir)
    if options.tls == "self-signed" or not installed.cert.exists() or installed.ca is not None:
        public_host = urllib.parse.urlsplit(public_url).hostname if public_url else None
        return tls.self_signed(gateway_dir, host, public_host).ca
    return None  # the user's own certificate, installed before


def _host(value: str) -> str:
    text = value.strip().strip("[]")
    if text == "localhost":
        return "127.0.0.1"
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise UsageError(f"--host {value!r} is not an IP address",
                         "Give one of this machine's addresses (`ip -br addr`), 0.0.0.0 for all of them, or "
                         "127.0.0.1 for this machine only.") from None


def _public_url(value: str) -> str:
    """An http(s) URL with a host, an optional port and path, no query: endpoints are appended to it."""
    if value == "":
        return ""
    text = value.strip().rstrip("/")
    parts = urllib.parse.urlsplit(text)
    try:
        port_ok = parts.port is None or 0 < parts.port < 65536
    except ValueError:
        port_ok = False
    if (parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment
            or parts.username or parts.password or not port_ok or not _plain(parts.path)):
        raise UsageError(f"--public-url {value!r} is not a URL such as https://models.example.com or "
                         "https://example.com:8443/ml (http or https, a host, an optional port and path, no query)")
    return text


def _plain(path: str) -> bool:
    return all(c.isalnum() or c in "/._~-" for c in path) and "//" not in path
