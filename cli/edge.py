"""Opening the gateway to the network: where it listens, its TLS, its public URL, and the rule that a
project open to anyone is only served beyond loopback when the user said so (--allow-unauthenticated,
Cloud Run's word for it).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import shutil
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from . import tls
from .errors import MlserveError, UsageError
from .gateway import PUBLIC_URL_RE, GatewaySettings
from .guard import Guard
from .platform import Platform
from .routing import Router
from .state import StateStore

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


def check_open_to_anyone(platform: Platform, guards: Iterable[tuple[str, Guard]],
                         settings: GatewaySettings | None = None, allowed: bool | None = None) -> None:
    """Refuse to serve a project that says `access: public` on a gateway others can reach, unless the
    user allowed it. ``settings``/``allowed`` are the gateway's to be; by default, its current ones.
    Raises UsageError naming the projects."""
    if settings is None:
        platform.forget_gateway()  # as the record has them now (a caller holding the lock sees the last word)
    to_be = settings or platform.gateway.settings
    if allowed is None:
        allowed = platform.state.get_setting(ALLOW_UNAUTHENTICATED) is not None
    public = sorted(key for key, guard in guards if guard.access == "public")
    if to_be.loopback or allowed or not public:
        return
    where = to_be.public_url or f"{to_be.host}, beyond this machine"
    raise UsageError(
        f"{', '.join(public)} {'is' if len(public) == 1 else 'are'} open to anyone (access: public), and the "
        f"gateway {'would be' if settings else 'is'} reachable at {where}",
        "Require tokens (`access: token` in mlserve.yml, `mlserve run --access token`, or `mlserve access token "
        "--project P`), or let anyone on the network call them: `mlserve gateway start --allow-unauthenticated`.",
    )


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
    if tls_on and public_url and public_url.startswith("http://"):
        raise UsageError(f"--public-url {public_url} is plain http, and the gateway speaks TLS",
                         "Give the https:// URL clients use (plain HTTP on the port is redirected there).")
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
    to_be = dataclasses.replace(current, host=host, tls=tls_on, public_url=public_url)
    with state.lock():
        check_open_to_anyone(platform, state.guards().items(), to_be, allowed)
        before = {key: state.get_setting(key) for key in SETTINGS}
        certificates = _Backup(tls.tls_dir(platform.home.gateway_dir))
        config = platform.gateway.config
        config_before = config.read_text() if config.exists() else None
        try:
            ca = _certificate(platform, options, host, public_url) if tls_on else None
            for key, value in changes.items():
                if value is not None:
                    _set(state, key, str(value))
            platform.forget_gateway()  # made again from the new settings
            Router(platform).apply(start=True)
        except BaseException:
            # Everything as it was: the settings, the certificate files, and the gateway serving with them.
            for key, old in before.items():
                _set(state, key, old or "")
            certificates.restore()
            platform.forget_gateway()
            changed = config_before is not None and (not config.exists() or config.read_text() != config_before)
            try:  # the old configuration again if the new one took effect, and the old table in any case
                if changed:
                    Router(platform).apply()
                else:
                    Router(platform).push()
            except MlserveError:
                pass  # the error to show is the new settings'; the supervisor keeps trying the old ones
            raise
        finally:
            certificates.discard()
    return GatewayStarted(platform.gateway.url, str(ca) if ca else None, to_be.loopback, tls_on)


def _set(state: StateStore, key: str, value: str) -> None:
    """A setting, or none when ``value`` is empty."""
    if value:
        state.set_setting(key, value)
    else:
        state.delete_setting(key)


class _Backup:
    """A copy of a folder that can be put back (the gateway's certificates while they change)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.copy = folder.with_name(folder.name + ".before")
        shutil.rmtree(self.copy, ignore_errors=True)
        if folder.exists():
            shutil.copytree(folder, self.copy)  # modes kept: the keys stay 0600

    def restore(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        if self.copy.exists():
            self.copy.rename(self.folder)

    def discard(self) -> None:
        shutil.rmtree(self.copy, ignore_errors=True)


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
    if (not PUBLIC_URL_RE.fullmatch(text) or not parts.hostname or parts.query or parts.fragment
            or parts.username or parts.password or not port_ok):
        raise UsageError(f"--public-url {value!r} is not a URL such as https://models.example.com or "
                         "https://example.com:8443/ml (http or https, a host, an optional port and path, no query)")
    return text

