"""The isolated network instances run on: out to the internet, but not to this host, private ranges,
the cloud metadata address or other instances.

Instances with `network: isolated` (the default) join one Docker bridge, ``mlserve0``, with
inter-container traffic off (Docker drops it). Two iptables chains do the rest: MLSERVE-ISOLATION
(jumped to from DOCKER-USER, for traffic the host forwards) drops packets to private, link-local,
loopback and other special ranges, except DNS to the host's own resolvers; MLSERVE-HOST (jumped to
from INPUT) drops every new connection from the bridge to the host itself. The chains are filled
once and left in place; they are checked before every instance starts, so a flushed firewall (a
reboot) is restored by the next start.
"""

from __future__ import annotations

import ipaddress
import re
import subprocess
from pathlib import Path

from filelock import FileLock

from .errors import MlserveError

NETWORK_NAME = "mlserve-isolated"
BRIDGE = "mlserve0"
FORWARD_CHAIN = "MLSERVE-ISOLATION"
HOST_CHAIN = "MLSERVE-HOST"
# Everything that is not the public internet (RFC 6890's special-purpose ranges that route somewhere).
# Azure's WireServer (168.63.129.16) is a cloud metadata service on a public address.
BLOCKED = ("0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
           "192.0.0.0/24", "192.168.0.0/16", "198.18.0.0/15", "224.0.0.0/4", "240.0.0.0/4", "168.63.129.16/32")
NETWORK_OPTIONS = {
    "com.docker.network.bridge.name": BRIDGE,
    "com.docker.network.bridge.enable_icc": "false",  # instances cannot reach each other
    "com.docker.network.bridge.enable_ip_masquerade": "true",
}
LOCK = Path("/run/mlserve-firewall.lock")  # /run is root's alone: nobody else can hold it
LOCK_TIMEOUT_S = 60
HINT = ("Instances are isolated with iptables, as root (`apt-get install -y iptables`). Or set `network: open` "
        "in mlserve.yml to run without that isolation.")


def nameservers(resolv_conf: str) -> list[str]:
    """The IPv4 resolvers in resolv.conf text that an instance's DNS queries go to."""
    found = []
    for match in re.finditer(r"^\s*nameserver\s+(\S+)", resolv_conf, re.MULTILINE):
        try:
            address = ipaddress.ip_address(match[1])
        except ValueError:
            continue
        if address.version == 4 and not address.is_loopback:
            found.append(str(address))
    return found


def rules(resolvers: list[str]) -> dict[str, list[list[str]]]:
    """The two chains' rules (iptables -A arguments after the chain name)."""
    forward = [["-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", "RETURN"]]
    for resolver in resolvers:
        for protocol in ("udp", "tcp"):
            forward.append(["-d", f"{resolver}/32", "-p", protocol, "--dport", "53", "-j", "RETURN"])
    forward += [["-d", blocked, "-j", "DROP"] for blocked in BLOCKED]
    host = [["-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", "RETURN"], ["-j", "DROP"]]
    return {FORWARD_CHAIN: forward, HOST_CHAIN: host}


# Docker puts DOCKER-USER first in FORWARD (and puts it back when it starts); a flushed FORWARD loses
# that jump too, and it is restored with the others.
JUMPS = (("FORWARD", "DOCKER-USER", ()), ("DOCKER-USER", FORWARD_CHAIN, ("-i", BRIDGE)),
         ("INPUT", HOST_CHAIN, ("-i", BRIDGE)))


def _in_place() -> bool:
    return all(_iptables("-C", parent, *match, "-j", chain, check=False) for parent, chain, match in JUMPS)


def ensure() -> None:
    """Make sure the chains are filled and jumped to. Raises MlserveError with advice."""
    if _in_place():
        return
    LOCK.parent.mkdir(parents=True, exist_ok=True)
    try:
        with FileLock(str(LOCK), timeout=LOCK_TIMEOUT_S):
            if _in_place():  # another command did it meanwhile
                return
            _fill()
    except TimeoutError:
        raise MlserveError(f"cannot isolate the instances' network: {LOCK} stayed locked for {LOCK_TIMEOUT_S} s",
                           HINT) from None


def _fill() -> None:
    try:
        resolv = Path("/etc/resolv.conf").read_text()
    except OSError:
        resolv = ""
    _iptables("-N", "DOCKER-USER", check=False)
    for chain, chain_rules in rules(nameservers(resolv)).items():
        _iptables("-N", chain, check=False)
        _iptables("-F", chain)
        for rule in chain_rules:
            _iptables("-A", chain, *rule)
    for parent, chain, match in JUMPS:
        if not _iptables("-C", parent, *match, "-j", chain, check=False):
            _iptables("-I", parent, "1", *match, "-j", chain)


def _iptables(*args: str, check: bool = True) -> bool:
    try:
        result = subprocess.run(["iptables", "-w", "10", *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise MlserveError(f"cannot isolate the instances' network: iptables failed to run ({exc})", HINT) from None
    if check and result.returncode != 0:
        raise MlserveError(f"cannot isolate the instances' network: iptables {' '.join(args)}: "
                           f"{result.stderr.strip()[:300]}", HINT)
    return result.returncode == 0
