"""The gateway opened to the network, called as another machine would: the client runs in a network
namespace of the test's own, joined to this host by a veth pair, and reaches the gateway on the
host's end of it. TLS is verified against mlserve's CA file; tokens, their revocation and expiry,
rate limits and CORS preflights are checked with real HTTP requests."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from tests.harness import EXAMPLES, CommandError, job_container, make_mlserve, seconds_until, teardown_mlserve, wait_for

pytestmark = pytest.mark.integration

# Runs inside the namespace: one request (or a TLS handshake only), its outcome as JSON.
CLIENT = """
import json, ssl, sys, socket
import requests
args = json.loads(sys.argv[1])
if args.get("handshake"):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(args["verify"])
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    context.minimum_version = context.maximum_version = getattr(ssl.TLSVersion, args["handshake"])
    try:
        with socket.create_connection((args["host"], args["port"]), timeout=5) as raw:
            with context.wrap_socket(raw, server_hostname=args["host"]) as tls:
                print(json.dumps({"version": tls.version()}))
    except (ssl.SSLError, OSError) as exc:
        print(json.dumps({"error": type(exc).__name__}))
    sys.exit()
try:
    answer = requests.request(args.get("method", "GET"), args["url"], headers=args.get("headers", {}),
                              verify=args.get("verify", True), allow_redirects=False, timeout=5)
    print(json.dumps({"status": answer.status_code, "headers": dict(answer.headers), "body": answer.text}))
except requests.RequestException as exc:
    print(json.dumps({"error": type(exc).__name__, "detail": str(exc)[:300]}))
"""


@dataclass(frozen=True)
class Namespace:
    name: str
    host_address: str  # this host's end of the veth pair: what the gateway listens on
    client_address: str

    def call(self, url: str, **args: object) -> dict:
        done = subprocess.run(["ip", "netns", "exec", self.name, sys.executable, "-c", CLIENT,
                               json.dumps({"url": url, **args})], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)


@pytest.fixture(scope="module")
def netns() -> Iterator[Namespace]:
    if not shutil.which("ip"):
        pytest.fail("iproute2 is not installed (make test installs it)")
    tag = f"{random.randrange(16**6):06x}"
    name, host_end, client_end = f"mlt{tag}", f"mlh{tag}", f"mlc{tag}"
    subnet = f"10.{random.randrange(200, 250)}.{random.randrange(256)}"
    host_address, client_address = f"{subnet}.1", f"{subnet}.2"
    steps = [
        ["ip", "netns", "add", name],
        ["ip", "link", "add", host_end, "type", "veth", "peer", "name", client_end],
        ["ip", "link", "set", client_end, "netns", name],
        ["ip", "addr", "add", f"{host_address}/30", "dev", host_end],
        ["ip", "link", "set", host_end, "up"],
        ["ip", "netns", "exec", name, "ip", "addr", "add", f"{client_address}/30", "dev", client_end],
        ["ip", "netns", "exec", name, "ip", "link", "set", client_end, "up"],
        ["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"],
    ]
    try:
        for step in steps:
            subprocess.run(step, check=True, capture_output=True)
        yield Namespace(name, host_address, client_address)
    finally:
        subprocess.run(["ip", "link", "del", host_end], capture_output=True)
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


@pytest.fixture
def mls(docker_client, nginx_available):
    ms = make_mlserve()
    yield ms
    teardown_mlserve(ms, docker_client)


def _project(tmp_path: Path, name: str, config: str = "") -> Path:
    target = tmp_path / name
    shutil.copytree(EXAMPLES / "hello", target)
    (target / "mlserve.yml").write_text(f"project: {name}\n{config}")
    return target


def _open(ms, netns: Namespace, *flags: str) -> dict:
    return ms.json("gateway", "start", "--host", netns.host_address, "--tls", "self-signed", *flags)


def _token(ms, project: str, *flags: str) -> str:
    made = ms.json("token", "create", "--project", project, *flags)
    assert made["token"].startswith("mls_") and made["name"]
    return made["token"]


def _bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def test_the_gateway_opens_over_tls_and_then_requires_tokens(mls, netns, tmp_path):
    project = _project(tmp_path, "edge")
    deployed = mls.json("run", "--mode", "serve", cwd=project)
    path = "/serve/tester/projects/edge"
    # The default gateway listens on loopback only: the other machine cannot reach it.
    unreachable = netns.call(f"http://{netns.host_address}:{mls.port}{path}")
    assert "error" in unreachable and deployed["project_endpoint"].startswith("http://127.0.0.1:")

    opened = _open(mls, netns)
    base = f"https://{netns.host_address}:{mls.port}"
    assert opened["url"] == base and Path(opened["ca_file"]).is_file()
    status = {j["id"]: j for j in mls.json("status")}
    assert status[deployed["id"]]["endpoint"] == f"{base}/serve/{deployed['id']}"

    # The certificate verifies against mlserve's CA, and only against it.
    assert netns.call(base + path, verify=False)["status"] == 401
    assert netns.call(base + path)["error"] == "SSLError"
    refused = netns.call(base + path, verify=opened["ca_file"])
    # Open to the network, a project that did not say `access: public` requires a token.
    assert refused["status"] == 401 and json.loads(refused["body"])["error"] == "missing token"
    assert refused["headers"]["WWW-Authenticate"].startswith("Bearer")
    token = _token(mls, "edge")
    answered = netns.call(base + path, verify=opened["ca_file"], headers=_bearer(token))
    assert answered["status"] == 200 and "hello" in answered["body"]
    # Every endpoint of the project is guarded, a job's own too.
    own = f"{base}/serve/{deployed['id']}"
    assert netns.call(own, verify=opened["ca_file"])["status"] == 401
    assert netns.call(own, verify=opened["ca_file"], headers=_bearer(token))["status"] == 200
    wrong = netns.call(base + path, verify=opened["ca_file"], headers=_bearer(token[:-1] + ("A" if token[-1] != "A" else "B")))
    assert wrong["status"] == 401 and 'error="invalid_token"' in wrong["headers"]["WWW-Authenticate"]

    # Plain HTTP is sent to HTTPS, the path and query kept.
    plain = netns.call(f"http://{netns.host_address}:{mls.port}{path}?x=1")
    assert plain["status"] == 308 and plain["headers"]["Location"] == f"{base}{path}?x=1"
    # TLS 1.2 and 1.3 only.
    tls = {version: netns.call("", handshake=version, host=netns.host_address, port=mls.port,
                               verify=opened["ca_file"]) for version in ("TLSv1_1", "TLSv1_2", "TLSv1_3")}
    assert tls["TLSv1_2"] == {"version": "TLSv1.2"} and tls["TLSv1_3"] == {"version": "TLSv1.3"}
    assert "error" in tls["TLSv1_1"]

    # A public URL (a DNS name, a proxy) is what every endpoint starts with.
    named = mls.json("gateway", "start", "--public-url", "https://models.example.com:8443/ml/")
    assert named["url"] == "https://models.example.com:8443/ml"
    assert mls.json("info", deployed["id"])["endpoint"] == f"https://models.example.com:8443/ml/serve/{deployed['id']}"

    # Back to loopback: the other machine cannot reach it any more; here it is plain HTTP and public again.
    closed = mls.json("gateway", "start", "--host", "127.0.0.1", "--tls", "off", "--public-url", "")
    assert closed["url"] == f"http://127.0.0.1:{mls.port}" and closed["ca_file"] is None
    assert "error" in netns.call(base + path, verify=opened["ca_file"])
    assert requests.get(f"{closed['url']}{path}", timeout=5).status_code == 200


def test_opening_is_refused_while_a_project_is_open_to_anyone(mls, netns, tmp_path):
    project = _project(tmp_path, "open", "access: public\n")
    mls("run", "--mode", "serve", cwd=project)
    local = f"http://127.0.0.1:{mls.port}/serve/tester/projects/open"
    conf = mls.gateway_conf()
    refused = mls("gateway", "start", "--host", netns.host_address, "--tls", "self-signed", check=False)
    assert refused.returncode != 0
    assert "tester/projects/open" in refused.stderr and "--allow-unauthenticated" in refused.stderr
    # Nothing moved: the gateway listens where it did, with the same settings, and serves.
    assert mls.gateway_conf() == conf and requests.get(local, timeout=5).status_code == 200
    # Beyond loopback, plain HTTP is refused as well.
    plain = mls("gateway", "start", "--host", netns.host_address, "--allow-unauthenticated", check=False)
    assert plain.returncode != 0 and "without TLS" in plain.stderr and mls.gateway_conf() == conf

    opened = _open(mls, netns, "--allow-unauthenticated")
    public = netns.call(f"{opened['url']}/serve/tester/projects/open", verify=opened["ca_file"])
    assert public["status"] == 200  # anyone, as the user allowed
    # A new public project on the open gateway is refused when the opening did not allow it.
    mls("access", "token", "--project", "open")
    _open(mls, netns)
    other = _project(tmp_path, "other", "access: public\n")
    jobs = mls.jobs()
    again = mls("run", "--mode", "serve", cwd=other, check=False)
    assert again.returncode != 0 and "--allow-unauthenticated" in again.stderr
    assert not [j for j in mls.json("status", "--all") if "/other/" in j["job"]] and mls.jobs().keys() == jobs.keys()


def test_tokens_revocation_and_expiry_take_effect_within_a_second(mls, netns, tmp_path):
    project = _project(tmp_path, "guarded", "access: token\n")
    mls("run", "--mode", "serve", cwd=project)
    opened = _open(mls, netns)
    url = f"{opened['url']}/serve/tester/projects/guarded"

    def status(token: str) -> int:
        return netns.call(url, verify=opened["ca_file"], headers=_bearer(token))["status"]

    keep, revoke = _token(mls, "guarded", "--name", "keep"), _token(mls, "guarded", "--name", "gone")
    short = _token(mls, "guarded", "--name", "short", "--expires", "2s")
    assert status(keep) == status(revoke) == status(short) == 200
    listed = {t["name"]: t for t in mls.json("token", "list", "--project", "guarded")}
    assert set(listed) == {"keep", "gone", "short"} and listed["short"]["expires"]
    assert all(t["status"] == "active" for t in listed.values())
    assert keep not in mls("token", "list").stdout and keep not in (mls.home / "state.db").read_bytes().decode(errors="replace")

    started = time.monotonic()
    mls("token", "revoke", "gone", "--project", "guarded")
    assert status(revoke) == 401 and time.monotonic() - started < 5  # refused once the command returned
    assert status(keep) == 200
    assert seconds_until(lambda: status(short) == 401, timeout=10, interval=0.2) is not None
    listed = {t["name"]: t["status"] for t in mls.json("token", "list", "--project", "guarded")}
    assert listed == {"keep": "active", "gone": "revoked", "short": "expired"}

    # Bad input says why and changes nothing.
    for flags in (["--name", "keep"], ["--name", "Bad Name!"], ["--expires", "soon"], ["--expires", "0"],
                  ["--rate", "fast"], ["--burst", "3"]):
        bad = mls("token", "create", "--project", "guarded", *flags, check=False)
        assert bad.returncode != 0 and bad.stderr.startswith("Error:"), flags
    assert len(mls.json("token", "list", "--project", "guarded")) == 3
    unknown = mls("token", "revoke", "nosuch", "--project", "guarded", check=False)
    assert unknown.returncode != 0 and "no token named nosuch" in unknown.stderr
    # Making the project public is live too; back to tokens, the revoked one stays refused.
    mls("access", "public", "--project", "guarded", check=False)  # refused: the gateway is open
    assert netns.call(url, verify=opened["ca_file"])["status"] == 401
    _open(mls, netns, "--allow-unauthenticated")
    mls("access", "public", "--project", "guarded")
    assert netns.call(url, verify=opened["ca_file"])["status"] == 200
    mls("access", "token", "--project", "guarded")
    assert status(revoke) == 401 and status(keep) == 200


def test_rate_limits_per_project_and_per_token(mls, tmp_path):
    project = _project(tmp_path, "limited", "access: token\nlimits: {rate: 2/s, burst: 3}\n")
    mls("run", "--mode", "serve", cwd=project)
    url = f"http://127.0.0.1:{mls.port}/serve/tester/projects/limited"
    token = _token(mls, "limited")
    with requests.Session() as session:
        answers = [session.get(url, headers=_bearer(token), timeout=5) for _ in range(6)]
    codes = [a.status_code for a in answers]
    assert codes[:3] == [200, 200, 200] and 429 in codes[3:]
    limited = next(a for a in answers if a.status_code == 429)
    assert limited.json()["error"] == "rate limit exceeded" and int(limited.headers["Retry-After"]) >= 1
    time.sleep(1.6)  # two requests a second: three more pass after a quiet spell
    assert requests.get(url, headers=_bearer(token), timeout=5).status_code == 200

    # A token's own limit, beside a project limit it stays under.
    (project / "mlserve.yml").write_text("project: limited\naccess: token\nlimits: {rate: 100/s, burst: 100}\n")
    mls("run", "--mode", "serve", "--replace", cwd=project)
    slow = _token(mls, "limited", "--rate", "1/s", "--burst", "2")
    with requests.Session() as session:
        codes = [session.get(url, headers=_bearer(slow), timeout=5).status_code for _ in range(4)]
        others = [session.get(url, headers=_bearer(token), timeout=5).status_code for _ in range(4)]
    assert codes[:2] == [200, 200] and codes[2:] == [429, 429]
    assert others == [200] * 4  # the project's limit is far away; the other token has none of its own


def test_cors_preflights_are_answered_at_the_gateway(mls, tmp_path):
    project = _project(tmp_path, "site", "access: token\ncors: {origins: [https://app.example.com]}\n")
    mls("run", "--mode", "serve", cwd=project)
    url = f"http://127.0.0.1:{mls.port}/serve/tester/projects/site"
    preflight = {"Origin": "https://app.example.com", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    allowed = requests.options(url, headers=preflight, timeout=5)  # no token: browsers send none here
    assert allowed.status_code == 204
    assert allowed.headers["Access-Control-Allow-Origin"] == "https://app.example.com"
    assert "POST" in allowed.headers["Access-Control-Allow-Methods"]
    assert allowed.headers["Access-Control-Allow-Headers"].lower() == "authorization, content-type"
    stranger = requests.options(url, headers={**preflight, "Origin": "https://evil.example.com"}, timeout=5)
    assert stranger.status_code == 403 and "Access-Control-Allow-Origin" not in stranger.headers
    # The answers themselves carry the origin, a 401 too (so the page can read why).
    token = _token(mls, "site")
    call = requests.get(url, headers={"Origin": "https://app.example.com", **_bearer(token)}, timeout=5)
    assert call.status_code == 200 and call.headers["Access-Control-Allow-Origin"] == "https://app.example.com"
    denied = requests.post(url, headers={"Origin": "https://app.example.com"}, timeout=5)
    assert denied.status_code == 401 and denied.headers["Access-Control-Allow-Origin"] == "https://app.example.com"
    # Without cors: in mlserve.yml, a preflight is the app's own business (the app may do CORS itself).
    other = _project(tmp_path, "plain")
    mls("run", "--mode", "serve", cwd=other)
    passed = requests.options(f"http://127.0.0.1:{mls.port}/serve/tester/projects/plain", headers=preflight, timeout=5)
    assert passed.status_code != 403 and "Access-Control-Allow-Origin" not in passed.headers
    assert "Access-Control-Allow-Origin" not in requests.get(
        url, headers={"Origin": "https://evil.example.com", **_bearer(token)}, timeout=5).headers


def test_bad_edge_settings_are_refused_and_change_nothing(mls, tmp_path):
    project = _project(tmp_path, "steady")
    mls("run", "--mode", "serve", cwd=project)
    conf = mls.gateway_conf()
    bad_cert = tmp_path / "cert.pem"
    bad_cert.write_text("not a certificate")
    for flags, says in ((["--host", "example.com"], "not an IP address"),
                        (["--host", "192.0.2.1", "--tls", "self-signed"], "cannot listen on"),
                        (["--public-url", "ftp://x"], "not a URL"),
                        (["--public-url", "https://x/a?b=c"], "not a URL"),
                        (["--tls-cert", str(bad_cert), "--tls-key", str(bad_cert)], "not a PEM certificate"),
                        (["--tls-cert", str(bad_cert)], "go together")):
        with pytest.raises(CommandError) as refused:
            mls("gateway", "start", *flags)
        assert says in str(refused.value), flags
        assert mls.gateway_conf() == conf
    for config, says in (("access: everyone\n", "access must be one of"),
                         ("limits: {rate: fast}\n", "50/s"),
                         ("limits: {burst: 5}\n", "given with a rate"),
                         ("cors: {origins: [evil.com/path]}\n", "origin")):
        (project / "mlserve.yml").write_text(f"project: steady\n{config}")
        bad = mls("run", "--mode", "serve", cwd=project, check=False)
        assert bad.returncode != 0 and says in bad.stderr, config
    assert [j["version"] for j in mls.json("status")] == [1]
    assert requests.get(f"http://127.0.0.1:{mls.port}/serve/tester/projects/steady", timeout=5).status_code == 200


def test_a_run_never_opens_a_project_that_was_closed(mls, tmp_path):
    project = _project(tmp_path, "closed")  # mlserve.yml says nothing of access
    mls("run", "--mode", "serve", cwd=project)
    url = f"http://127.0.0.1:{mls.port}/serve/tester/projects/closed"
    assert requests.get(url, timeout=5).status_code == 200  # public: the gateway is on loopback
    mls("access", "token", "--project", "closed")
    assert requests.get(url, timeout=5).status_code == 401
    mls("run", "--mode", "serve", "--replace", cwd=project)
    assert requests.get(url, timeout=5).status_code == 401
    assert "closed: token" in mls("access", "--project", "closed").stdout


def test_healing_keeps_the_gateways_new_settings(mls, netns, docker_client, tmp_path):
    # The supervisor started before the gateway was opened; routes it applies after healing a job must
    # keep the gateway where the user put it (address, TLS), not the settings it first read.
    project = _project(tmp_path, "healed", "access: token\n")
    deployed = mls.json("run", "--mode", "serve", cwd=project)
    opened = _open(mls, netns)
    token = _token(mls, "healed")
    job_container(docker_client, mls.home, deployed["id"]).kill()
    assert wait_for(lambda: (j := mls.jobs()[deployed["job"]])["healthy"] and j["restarts"] >= 1, timeout=60)
    assert f"listen {netns.host_address}:{mls.port} ssl" in mls.gateway_conf()
    answer = netns.call(f"{opened['url']}/serve/tester/projects/healed", verify=opened["ca_file"], headers=_bearer(token))
    assert answer["status"] == 200


def test_opening_on_all_addresses_of_the_same_port_and_closing_again(mls, netns, tmp_path):
    # 127.0.0.1:P and 0.0.0.0:P overlap: the gateway moves from one to the other on the same port.
    project = _project(tmp_path, "everywhere")
    mls("run", "--mode", "serve", cwd=project)
    path = "/serve/tester/projects/everywhere"
    opened = mls.json("gateway", "start", "--host", "0.0.0.0", "--tls", "self-signed")
    assert not opened["url"].startswith("https://0.0.0.0")
    # Every address: the other machine reaches it on the veth address, which the certificate names.
    token = _token(mls, "everywhere")
    answer = netns.call(f"https://{netns.host_address}:{mls.port}{path}", verify=opened["ca_file"],
                        headers=_bearer(token))
    assert answer["status"] == 200
    assert requests.get(f"https://127.0.0.1:{mls.port}{path}", verify=opened["ca_file"], timeout=5).status_code == 401
    closed = mls.json("gateway", "start", "--host", "127.0.0.1", "--tls", "off")
    assert closed["url"] == f"http://127.0.0.1:{mls.port}"
    assert requests.get(f"{closed['url']}{path}", timeout=5).status_code == 200
    assert "error" in netns.call(f"http://{netns.host_address}:{mls.port}{path}")


def test_a_public_url_means_others_reach_it_and_the_app_never_sees_a_token(mls, tmp_path):
    # Behind a proxy the gateway listens on loopback, yet others call it: tokens are required.
    project = tmp_path / "proxied"
    shutil.copytree(Path(__file__).parent / "apps" / "probe", project)
    (project / "mlserve.yml").write_text("project: proxied\n")
    mls("run", "--mode", "serve", cwd=project)
    url = f"http://127.0.0.1:{mls.port}/serve/tester/projects/proxied"
    assert requests.get(url, headers=_bearer("mls_whatever"), timeout=5).json()["headers"]["HTTP_AUTHORIZATION"]
    named = mls.json("gateway", "start", "--public-url", "https://models.example.com")
    assert named["network"] is True and named["url"] == "https://models.example.com"
    assert requests.get(url, timeout=5).status_code == 401
    token = _token(mls, "proxied", "--name", "ci")
    seen = requests.get(url, headers={**_bearer(token), "X-Mlserve-Token": "admin"}, timeout=5).json()["headers"]
    assert "HTTP_AUTHORIZATION" not in seen and seen["HTTP_X_MLSERVE_TOKEN"] == "ci"
