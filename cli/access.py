"""Changing who may call a project: its tokens and its access, live in the gateway when the command
returns (the routing table is pushed; nginx is not reloaded)."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

from .config import ValueProblem, duration_s
from .edge import check_open_to_anyone
from .errors import JobNotFoundError, MlserveError, UsageError
from .guard import ACCESS, TOKEN_NAME_RE, Guard, Token, digest, new_token, rate_limit
from .platform import Platform
from .routing import Router

MAX_EXPIRES_S = 100 * 365 * 86400


@dataclass(frozen=True)
class NewToken:
    token: Token
    secret: str  # shown once, never stored


class Access:
    def __init__(self, platform: Platform) -> None:
        self.platform = platform
        self.state = platform.state

    def create_token(self, owner: str, project: str, name: str | None = None, expires: str | None = None,
                     rate: str | None = None, burst: int | None = None) -> NewToken:
        """A new token for the project, valid on its endpoints as soon as this returns.
        Raises UsageError for a bad name, duration or rate, or a name in use."""
        expires_at = None
        if expires is not None:
            try:
                seconds = duration_s(expires)
            except ValueProblem as problem:
                raise UsageError(f"--expires {expires!r} is not {problem}") from None
            if not 0 < seconds <= MAX_EXPIRES_S:
                raise UsageError("--expires must be a duration above zero and at most 100 years, such as 30d or 12h")
            expires_at = time.time() + seconds
        limit = None
        if rate is not None:
            try:
                limit = rate_limit(rate, burst)
            except ValueError as exc:
                raise UsageError(f"--rate {rate!r}/--burst: {exc}") from None
        elif burst is not None:
            raise UsageError("--burst goes with --rate", "e.g. `--rate 10/s --burst 20`.")
        secret = new_token()
        with self.state.lock():
            now = time.time()
            taken = {t.name for t in self.state.tokens(owner, project) if t.status(now) == "active"}
            if name is None:
                name = next(f"token-{n}" for n in range(1, len(taken) + 2) if f"token-{n}" not in taken)
            elif not TOKEN_NAME_RE.fullmatch(name):
                raise UsageError(f"token name {name!r} must be lower-case letters, digits, '.', '_' or '-' "
                                 "(at most 63, starting with a letter or digit)")
            elif name in taken:
                raise UsageError(f"{owner}/projects/{project} already has a token named {name}",
                                 f"Revoke it first (`mlserve token revoke {name} --project {project}`) or pick another name.")
            token = Token(owner, project, name, digest(secret), now, expires_at, None, limit)
            self.state.add_token(token)
            try:
                Router(self.platform).apply()
            except MlserveError as exc:  # the token is made: it must be shown; it works once the gateway does
                self.platform.report(f"Notice: the gateway did not take the new token yet: {exc.message}")
        return NewToken(token, secret)

    def tokens(self, owner: str, project: str | None) -> list[Token]:
        return self.state.tokens(owner, project)

    def revoke(self, owner: str, project: str, name: str) -> Token:
        """Revoke a token: refused from the next request on. Raises JobNotFoundError for an unknown name."""
        with self.state.lock():
            if not self.state.revoke_token(owner, project, name, time.time()):
                if not any(t.name == name for t in self.state.tokens(owner, project)):
                    raise JobNotFoundError(f"{owner}/projects/{project} has no token named {name}",
                                           f"`mlserve token list --project {project}` lists them.")
            # Revoked already (perhaps by a command whose push failed): pushed again all the same.
            Router(self.platform).apply()
        return next(t for t in self.state.tokens(owner, project) if t.name == name)

    def set_access(self, owner: str, project: str, access: str) -> Guard:
        """Require tokens, or let anyone call the project, from the next request on. Raises UsageError."""
        if access not in ACCESS:
            raise UsageError(f"access must be one of {', '.join(ACCESS)}")
        key = f"{owner}/projects/{project}"
        with self.state.lock():
            if key not in self.state.projects():
                raise JobNotFoundError(f"no project {key}", "`mlserve status --all` lists the projects.")
            guard = replace(self.state.guard(owner, project), access=access)
            check_open_to_anyone(self.platform, [(key, guard)])
            self.state.set_guard(owner, project, guard)
            Router(self.platform).apply()
        return guard
