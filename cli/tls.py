"""The gateway's certificate: the user's own files, or one mlserve makes for this host's names and
addresses, signed by a local CA whose file clients trust (``curl --cacert``, ``REQUESTS_CA_BUNDLE``).

Everything lives in ``$MLSERVE_HOME/gateway/tls``, private to root: the keys never leave it, and the
gateway reads its copies, so moving or editing the user's files later cannot break a reload.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import GatewayError, UsageError
from .programs import find_program

CERT_NAME, KEY_NAME = "cert.pem", "key.pem"
CA_NAME, CA_KEY_NAME = "ca.pem", "ca.key"
NAMES_NAME = "names.json"  # the names the self-signed certificate was made for
CA_DAYS, CERT_DAYS = 3650, 825  # 825: the longest validity Apple's clients accept for a server certificate
RENEW_BEFORE_S = 30 * 86400  # a self-signed certificate this close to its end is made again
OPENSSL_HINT = "Install it with `apt-get install -y openssl` (or `mlserve setup` as root)."


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    ca: Path | None  # the CA clients should trust; None for the user's own certificate


def tls_dir(gateway_dir: Path) -> Path:
    return gateway_dir / "tls"


def installed(gateway_dir: Path) -> TlsFiles:
    folder = tls_dir(gateway_dir)
    ca = folder / CA_NAME
    return TlsFiles(folder / CERT_NAME, folder / KEY_NAME, ca if ca.exists() else None)


def install_files(gateway_dir: Path, cert: Path, key: Path) -> TlsFiles:
    """Copy the user's certificate (chain) and key in, after checking they are PEM and belong together.

    Raises UsageError naming the file that is wrong. The self-signed CA, if any, is removed: its
    file no longer says whom to trust.
    """
    for path, what in ((cert, "--tls-cert"), (key, "--tls-key")):
        if not path.is_file():
            raise UsageError(f"{what} {path}: no such file")
    _openssl("x509", "-in", str(cert), "-noout", problem=f"--tls-cert {cert} is not a PEM certificate")
    _openssl("pkey", "-in", str(key), "-noout", problem=f"--tls-key {key} is not a PEM private key (without a passphrase)")
    cert_public = _openssl("x509", "-in", str(cert), "-noout", "-pubkey", problem=f"--tls-cert {cert} is unreadable")
    key_public = _openssl("pkey", "-in", str(key), "-pubout", problem=f"--tls-key {key} is unreadable")
    if cert_public.strip() != key_public.strip():
        raise UsageError(f"--tls-key {key} is not the key of --tls-cert {cert}")
    folder = _private_dir(gateway_dir)
    _copy_private(cert, folder / CERT_NAME)
    _copy_private(key, folder / KEY_NAME)
    for name in (CA_NAME, CA_KEY_NAME, NAMES_NAME):
        (folder / name).unlink(missing_ok=True)
    return installed(gateway_dir)


def self_signed(gateway_dir: Path, host: str, public_host: str | None) -> TlsFiles:
    """A certificate for this host's names and addresses (and ``host``, and the public URL's host),
    signed by mlserve's local CA (made once and kept, so clients that trust it keep trusting it).
    A certificate that already names all of them is kept as it is."""
    folder = _private_dir(gateway_dir)
    names = host_names(host, public_host)
    ca, ca_key = folder / CA_NAME, folder / CA_KEY_NAME
    if not (ca.exists() and ca_key.exists()):
        _make_ca(folder)
    files = installed(gateway_dir)
    try:
        made_for = set(json.loads((folder / NAMES_NAME).read_text()))
    except (OSError, ValueError, TypeError):
        made_for = set()
    if files.cert.exists() and files.key.exists() and set(names) <= made_for and _valid_for(files.cert, RENEW_BEFORE_S):
        return files
    _make_cert(folder, names)
    (folder / NAMES_NAME).write_text(json.dumps(names))
    return installed(gateway_dir)


def _valid_for(cert: Path, seconds: int) -> bool:
    """Whether the certificate is still valid ``seconds`` from now."""
    openssl = find_program("openssl")
    return bool(openssl) and subprocess.run(
        [str(openssl), "x509", "-in", str(cert), "-noout", "-checkend", str(seconds)],
        capture_output=True, stdin=subprocess.DEVNULL).returncode == 0


def host_names(host: str, public_host: str | None) -> list[str]:
    """What a client may call this machine: its host names, localhost, every address it has now,
    the address the gateway listens on and the public URL's host."""
    names = {"localhost", socket.gethostname(), socket.getfqdn(), "127.0.0.1", "::1", *local_addresses()}
    if not ipaddress.ip_address(host).is_unspecified:
        names.add(host)
    if public_host:
        names.add(public_host)
    return sorted(name for name in names if name and _is_name_or_address(name))


def local_addresses() -> list[str]:
    """This machine's IP addresses (``ip -j addr``); empty when iproute2 is missing."""
    ip = find_program("ip")
    if not ip:
        return []
    shown = subprocess.run([ip, "-j", "addr", "show"], capture_output=True, text=True)
    try:
        links = json.loads(shown.stdout or "[]")
    except ValueError:
        return []
    return [entry["local"] for link in links for entry in link.get("addr_info", [])
            if isinstance(entry.get("local"), str) and entry.get("scope") != "link"]


def _is_name_or_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return all(part and len(part) < 64 and part.replace("-", "").isalnum() and part.isascii()
                   for part in name.split("."))


def _san(names: list[str]) -> str:
    entries = []
    for name in names:
        try:
            entries.append(f"IP:{ipaddress.ip_address(name)}")
        except ValueError:
            entries.append(f"DNS:{name}")
    return ",".join(entries)


def _make_ca(folder: Path) -> None:
    with tempfile.TemporaryDirectory(dir=folder) as work:
        key, cert = Path(work) / CA_KEY_NAME, Path(work) / CA_NAME
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                 "-keyout", str(key), "-out", str(cert), "-days", str(CA_DAYS),
                 "-subj", f"/CN=mlserve local CA ({_short(socket.gethostname())})",
                 "-addext", "basicConstraints=critical,CA:TRUE,pathlen:0",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign",
                 problem="the local CA could not be made")
        key.chmod(0o600)
        cert.chmod(0o644)  # the one file meant to be handed out
        key.replace(folder / CA_KEY_NAME)
        cert.replace(folder / CA_NAME)


def _make_cert(folder: Path, names: list[str]) -> None:
    with tempfile.TemporaryDirectory(dir=folder) as work:
        key, request, cert, extensions = (Path(work) / n for n in (KEY_NAME, "request.csr", CERT_NAME, "ext.cnf"))
        extensions.write_text(
            f"subjectAltName={_san(names)}\nbasicConstraints=critical,CA:FALSE\n"
            "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
            "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n")
        _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", str(key),
                 "-out", str(request), "-subj", f"/CN={_short(names[0] if names else 'mlserve')}",
                 problem="the gateway's key could not be made")
        _openssl("x509", "-req", "-in", str(request), "-CA", str(folder / CA_NAME), "-CAkey", str(folder / CA_KEY_NAME),
                 "-set_serial", str(int.from_bytes(os.urandom(16), "big")), "-days", str(CERT_DAYS),
                 "-extfile", str(extensions), "-out", str(cert),
                 problem="the gateway's certificate could not be signed")
        key.chmod(0o600)
        key.replace(folder / KEY_NAME)
        cert.replace(folder / CERT_NAME)


def _short(text: str) -> str:
    return "".join(c for c in text if c.isalnum() or c in ".-")[:60] or "mlserve"


def _private_dir(gateway_dir: Path) -> Path:
    folder = tls_dir(gateway_dir)
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    return folder


def _copy_private(source: Path, target: Path) -> None:
    temporary = target.with_name(target.name + ".new")
    temporary.unlink(missing_ok=True)
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out, source.open("rb") as data:
        shutil.copyfileobj(data, out)
    temporary.replace(target)


def _openssl(*args: str, problem: str) -> str:
    openssl = find_program("openssl")
    if not openssl:
        raise GatewayError("the gateway's TLS needs openssl, which is not installed", OPENSSL_HINT)
    done = subprocess.run([openssl, *args], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        detail = done.stderr.strip().splitlines()
        raise UsageError(problem, detail[-1][:300] if detail else None)
    return done.stdout
