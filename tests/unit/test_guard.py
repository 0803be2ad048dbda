"""Who may call a project: rates, origins and tokens as mlserve.yml and the command line give them,
and the guard the router enforces (only hashes of active tokens reach it)."""

from __future__ import annotations

import base64
import hashlib

import pytest

from mlserve.config import load_config
from mlserve.errors import ProjectConfigError
from mlserve.guard import Cors, Guard, RateLimit, Token, digest, guard_table, new_token, origin, parse_rate, rate_limit


@pytest.mark.parametrize("text, per_s", [("50/s", 50.0), ("600/m", 10.0), ("3600/h", 1.0), ("2.5/s", 2.5), (7, 7.0),
                                          ("1 / minute", 1 / 60)])
def test_rates(text, per_s):
    assert parse_rate(text) == pytest.approx(per_s)


@pytest.mark.parametrize("text", ["0/s", "-1/s", "fast", "5/d", True, None, "2000000/s", "0.0001/s", "1e-320/s"])
def test_bad_rates_are_refused(text):
    with pytest.raises(ValueError, match="50/s"):
        parse_rate(text)


def test_burst_defaults_to_a_seconds_worth():
    assert rate_limit("50/s", None) == RateLimit(50.0, 50)
    assert rate_limit("1/m", None) == RateLimit(1 / 60, 1)
    assert rate_limit("5/s", 20) == RateLimit(5.0, 20)
    for burst in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="burst"):
            rate_limit("5/s", burst)


@pytest.mark.parametrize("value, expected", [("https://App.Example.com/", "https://app.example.com"),
                                             ("http://localhost:3000", "http://localhost:3000"), ("*", "*")])
def test_origins(value, expected):
    assert origin(value) == expected


@pytest.mark.parametrize("value", ["example.com", "https://example.com/path", "ftp://x", "https://a b", "", 3,
                                   "https://x\r\nSet-Cookie: a=b"])
def test_bad_origins_are_refused(value):
    with pytest.raises(ValueError, match="origin"):
        origin(value)


def test_tokens_are_random_and_stored_as_their_hash():
    token = new_token()
    assert token.startswith("mls_") and len(token) == 44 and token != new_token()
    assert digest(token) == base64.b64encode(hashlib.sha256(token.encode()).digest()).decode()
    assert token not in digest(token)


def test_access_follows_the_gateway_unless_the_project_says():
    assert Guard().effective_access(loopback_gateway=True) == "public"
    assert Guard().effective_access(loopback_gateway=False) == "token"
    assert Guard("public").effective_access(loopback_gateway=False) == "public"
    assert Guard("token").effective_access(loopback_gateway=True) == "token"


def test_the_routers_guard_holds_active_tokens_hashes_only():
    now = 1000.0
    tokens = [Token("a", "p", "live", "D1", 1.0), Token("a", "p", "slow", "D2", 1.0, rate=RateLimit(1.0, 2)),
              Token("a", "p", "old", "D3", 1.0, expires_at=999.0), Token("a", "p", "gone", "D4", 1.0, revoked_at=5.0),
              Token("a", "p", "soon", "D5", 1.0, expires_at=2000.0)]
    table = guard_table(Guard("token", RateLimit(50.0, 100), Cors(("https://a.example",))), True, tokens, now)
    assert table == {"access": "token", "rate": 50.0, "burst": 100, "cors": ["https://a.example"], "tokens": {
        "D1": {"name": "live", "expires": 0}, "D2": {"name": "slow", "expires": 0, "rate": 1.0, "burst": 2},
        "D5": {"name": "soon", "expires": 2000.0}}}
    assert guard_table(Guard(), True, tokens, now) == {"access": "public"}  # no tokens pushed where none is asked


def test_mlserve_yml_guard_settings(tmp_path):
    (tmp_path / "mlserve.yml").write_text(
        "access: token\nlimits: {rate: 50/s, burst: 100, memory: 1g}\ncors: {origins: [https://a.example]}\n")
    config = load_config(tmp_path)
    assert config.access == "token" and config.rate == RateLimit(50.0, 100) and config.limits.memory_bytes == 1 << 30
    assert config.cors == Cors(("https://a.example",))


@pytest.mark.parametrize("text, says", [("access: everyone", "access must be one of public, token"),
                                        ("limits: {rate: 0/s}", "limits.rate"),
                                        ("limits: {burst: 5}", "given with a rate"),
                                        ("cors: [https://a.example]", "cors must be a mapping"),
                                        ("cors: {origins: [a.example]}", "origin")])
def test_bad_guard_settings_name_their_key(tmp_path, text, says):
    (tmp_path / "mlserve.yml").write_text(text)
    with pytest.raises(ProjectConfigError, match=says):
        load_config(tmp_path)
