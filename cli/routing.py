"""Who takes traffic: the gateway's routes, derived from the record of jobs and applied to nginx.

Callers hold the state lock while they change the record and apply the routes that follow from
it, so two commands never render the gateway from two different pictures.
"""

from __future__ import annotations

import time

from .gateway import ProjectTraffic, Route
from .guard import Token, guard_table
from .platform import Platform

STOPPED_BY_USER = "gateway.stopped"  # set by `gateway stop`: nothing brings the gateway back but `gateway start`


class Router:
    def __init__(self, platform: Platform) -> None:
        self.platform = platform
        self.state = platform.state

    def routes(self) -> list[Route]:
        """Active jobs as the gateway routes them: only healthy running ones take traffic."""
        fallback = self.state.fallback_versions()
        return [
            Route(job.id, job.name, job.project_key, str(self.platform.home.socket(job.id)),
                  job.healthy and job.state == "running", job.version,
                  (job.owner, job.project, job.version) in fallback)
            for job in self.state.jobs(active_only=True)
            if job.state != "stopping"
        ]

    def projects(self) -> list[ProjectTraffic]:
        """Every project on record with its traffic split and its newest version."""
        latest: dict[str, int] = {}
        for version in self.state.versions():
            latest[version.project_key] = max(latest.get(version.project_key, 0), version.number)
        loopback, now = self.platform.gateway.settings.loopback, time.time()
        tokens: dict[str, list[Token]] = {}
        for token in self.state.tokens():
            tokens.setdefault(token.project_key, []).append(token)
        projects = []
        for key, guard in self.state.guards().items():
            owner, _, project = key.split("/", 2)
            table = guard_table(guard, loopback, tokens.get(key, []), now)
            projects.append(ProjectTraffic(key, self.state.traffic(owner, project), latest.get(key, 0), table))
        return projects

    @property
    def stopped_by_user(self) -> bool:
        return self.state.get_setting(STOPPED_BY_USER) is not None

    def apply(self, start: bool = False) -> None:
        """Render the gateway from the record: reload it when it runs; start it when ``start`` (a command
        that serves) or when it died while jobs serve and the user did not stop it.

        Raises GatewayError (and its subclasses) with nginx's words.
        """
        # The settings as the record has them now (the caller holds the lock): a long-lived caller such as
        # the supervisor must not put back what `gateway start` has changed since it last looked.
        self.platform.forget_gateway()
        gateway = self.platform.gateway
        if start:
            self.state.delete_setting(STOPPED_BY_USER)
        if gateway.is_running() or start or (not self.stopped_by_user and self.state.jobs(active_only=True)):
            gateway.apply(self.routes(), self.projects())

    def push(self) -> None:
        """Hand the running gateway the table from the record, its configuration untouched (after a
        failed settings change that had pushed the new settings' table first)."""
        self.platform.forget_gateway()
        gateway = self.platform.gateway
        if gateway.is_running():
            gateway.push(self.routes(), self.projects())

    def stop_gateway(self) -> bool:
        """Stop nginx and remember that the user wants it stopped; False when it was not running."""
        self.state.set_setting(STOPPED_BY_USER, "1")
        return self.platform.gateway.stop()
