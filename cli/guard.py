"""Who may call a project's endpoints, and how often: access (anyone, or bearer tokens), rate limits
(for the project and for each token) and the web origins that may call it from a browser (CORS).

The gateway's router enforces all of it per request from the routing table (guard_table), so a new
token, a revocation or a new limit is live when the command that made it returns, with no reload.
Only a token's hash is stored and pushed; the token itself is printed once.
"""

from __future__ import annotations

import base64
import hashlib
import math
import re
import secrets
import string
from dataclasses import dataclass
from typing import Any

ACCESS = ("public", "token")
TOKEN_PREFIX = "mls_"
TOKEN_LENGTH = 40  # base62 characters after the prefix: 238 random bits
_ALPHABET = string.ascii_letters + string.digits
TOKEN_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")
ORIGIN_RE = re.compile(r"https?://[a-z0-9]([a-z0-9.-]*[a-z0-9])?(:[0-9]{1,5})?")
RATE_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*/\s*(s|sec|second|m|min|minute|h|hour)$")
_RATE_UNITS = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60, "h": 3600, "hour": 3600}
RATE_FORM = "a rate such as 50/s, 600/m or 1000/h"
MAX_RATE_PER_S = 1_000_000.0
MIN_RATE_PER_S = 1 / 3600


@dataclass(frozen=True)
class RateLimit:
    per_s: float  # requests a second, on average
    burst: int  # requests that may come at once after a quiet spell

    def as_table(self) -> dict[str, float | int]:
        return {"rate": self.per_s, "burst": self.burst}

    def describe(self) -> str:
        return f"{self.per_s:g}/s, burst {self.burst}"


@dataclass(frozen=True)
class Cors:
    origins: tuple[str, ...]  # exact origins, or "*" for any


@dataclass(frozen=True)
class Guard:
    """A project's guard as its latest run (or `mlserve access`) set it.

    ``access`` None: it follows the gateway (public while it listens on loopback only, tokens once
    it is open to the network).
    """

    access: str | None = None
    rate: RateLimit | None = None
    cors: Cors | None = None

    def effective_access(self, loopback_gateway: bool) -> str:
        return self.access or ("public" if loopback_gateway else "token")


@dataclass(frozen=True)
class Token:
    owner: str
    project: str
    name: str
    digest: str  # base64 of the token's SHA-256: what the router compares
    created_at: float
    expires_at: float | None = None
    revoked_at: float | None = None
    rate: RateLimit | None = None

    @property
    def project_key(self) -> str:
        return f"{self.owner}/projects/{self.project}"

    def status(self, now: float) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and now >= self.expires_at:
            return "expired"
        return "active"


def new_token() -> str:
    return TOKEN_PREFIX + "".join(secrets.choice(_ALPHABET) for _ in range(TOKEN_LENGTH))


def digest(token: str) -> str:
    """What is stored and compared: SHA-256 (the token is random, so no salt or stretching is needed)."""
    return base64.b64encode(hashlib.sha256(token.encode()).digest()).decode()


def parse_rate(value: object) -> float:
    """``50/s``, ``600/m``, ``1000/h`` (or a bare number: per second) as requests a second.
    Raises ValueError with the expected form."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(RATE_FORM)
    text = str(value).strip().lower()
    match = RATE_RE.match(text if "/" in text else f"{text}/s")
    if not match:
        raise ValueError(RATE_FORM)
    per_s = float(match.group(1)) / _RATE_UNITS[match.group(2)]
    if not MIN_RATE_PER_S <= per_s <= MAX_RATE_PER_S:
        raise ValueError(f"{RATE_FORM}, from 1/h to {MAX_RATE_PER_S:g}/s")
    return per_s


def rate_limit(rate: object, burst: object | None) -> RateLimit:
    """A rate limit from ``rate`` and an optional ``burst`` (default: one second's worth, at least 1).
    Raises ValueError with the expected form."""
    per_s = parse_rate(rate)
    if burst is None:
        return RateLimit(per_s, max(1, math.ceil(per_s)))
    if isinstance(burst, bool) or not isinstance(burst, int) or not 1 <= burst <= 1_000_000:
        raise ValueError("burst must be a whole number from 1 to 1000000")
    return RateLimit(per_s, burst)


def origin(value: object) -> str:
    """One CORS origin: ``*`` or scheme://host[:port] (no path). Raises ValueError."""
    if value == "*":
        return "*"
    text = str(value).strip().lower().rstrip("/") if isinstance(value, str) else ""
    if not ORIGIN_RE.fullmatch(text):
        raise ValueError(f"an origin such as https://example.com or http://localhost:3000, or *, not {value!r}")
    return text


def guard_table(guard: Guard, loopback_gateway: bool, tokens: list[Token], now: float) -> dict[str, Any]:
    """The part of a project's routing-table entry the router guards it with."""
    table: dict[str, Any] = {"access": guard.effective_access(loopback_gateway)}
    if table["access"] == "token":
        table["tokens"] = {
            token.digest: {"name": token.name, "expires": token.expires_at or 0,
                           **(token.rate.as_table() if token.rate else {})}
            for token in tokens if token.status(now) == "active"
        }
    if guard.rate:
        table.update(guard.rate.as_table())
    if guard.cors:
        table["cors"] = list(guard.cors.origins)
    return table
