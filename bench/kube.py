"""Beyond one machine (issue 10): how fast mlserve's commands are on a Kubernetes cluster.

The cluster is a real control plane on loopback (tests/cluster/controlplane.py: kube-apiserver 1.20, etcd,
controller manager, scheduler, hollow kubemark nodes and a docker-registry), started for this section and
stopped at its end. Hollow nodes run no containers: a pod is Running as soon as it is scheduled and its exec
probes pass at once, so what is measured is mlserve's own work (build, push, objects applied, reading the
cluster back) and the control plane's (scheduling, the kubelets' status reports), not a container starting.

One sandboxed mlserve (bench/sandbox.py) with the control plane added as cluster `bench`; every project is a
copy of bench/apps/hello with `access: public` (a cluster refuses anything else). Every command is bounded in
time; every project is stopped on the cluster and the control plane stopped, whatever happened."""

from __future__ import annotations

import calendar
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from results import BenchError, Result, one_line, run_scenarios
from sandbox import sandbox

from mlserve.kube.render import ProjectRef
from tests.harness import REPO, Mlserve

KUBE = "Beyond one machine: Kubernetes (issue 10)"
HELLO_APP = REPO / "bench" / "apps" / "hello"
CLUSTER = "bench"
NAMESPACE = "bench"
URL = "http://models.test"
# Hollow nodes have 1 CPU each and a job's pod requests 100m: 3 nodes hold exactly 30 jobs, with nothing to
# spare for a pod that is still terminating. A fourth node leaves room.
NODES = 4
TIMED_RUNS = 3  # runs of a new project each, after a first one that builds and pushes
SCALE_TO = 10
STATUS_JOBS = 30
STATUS_ROUNDS = 5
APPLIED_TARGET_S = 3.0
SCALE_TARGET_S = 15.0
STATUS_TARGET_S = 1.0
# Bounds: a cluster command waits this long for pods to be ready before it rolls back (MLSERVE_CLUSTER_WAIT_S),
# and every command is killed after COMMAND_S (a first build may pull the base image).
READY_WAIT_S = 120
COMMAND_S = 600
STOP_S = 120


def _median(values: list[float]) -> float:
    return statistics.median(values)


def _epoch(stamp: str) -> float:
    """A Kubernetes timestamp (2026-11-24T11:25:30Z) as a time.time()."""
    return calendar.timegm(time.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ"))


def _seconds_list(values: list[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


class KubeBench:
    """The scenarios, on one mlserve whose cluster `bench` is ``plane``; remembers every project it started."""

    def __init__(self, ms: Mlserve, plane: Any, work: Path) -> None:
        self.ms, self.plane, self.work = ms, plane, work
        self.projects: list[str] = []

    # helpers ------------------------------------------------------------------------------------

    def _folder(self, name: str) -> Path:
        folder = self.work / name
        shutil.copytree(HELLO_APP, folder)
        (folder / "mlserve.yml").write_text(f"project: {name}\naccess: public\n")
        return folder

    def _run(self, name: str) -> tuple[float, dict[str, Any]]:
        """`run --mode serve --cluster bench --json` of a new project ``name``: wall seconds and its output."""
        folder = self._folder(name)
        self.projects.append(name)
        wall, result = self.ms.timed("run", "--mode", "serve", "--cluster", CLUSTER, "--json", cwd=folder,
                                     timeout=COMMAND_S)
        out: dict[str, Any] = json.loads(result.stdout)
        print(f"   run {name}: {wall:.2f} s wall; seconds {out['seconds']}", flush=True)
        return wall, out

    def _status(self) -> tuple[float, list[dict[str, Any]]]:
        wall, result = self.ms.timed("status", "--cluster", CLUSTER, "--json", timeout=60)
        jobs: list[dict[str, Any]] = json.loads(result.stdout)
        return wall, jobs

    def _project_jobs(self, jobs: list[dict[str, Any]], project: str) -> list[dict[str, Any]]:
        return [j for j in jobs if j["job"].startswith(f"bench/projects/{project}/")]

    def stop(self, project: str) -> None:
        result = self.ms("stop", "--project", project, "--cluster", CLUSTER, check=False, timeout=STOP_S)
        if result.returncode != 0:
            print(f"   stop --project {project} --cluster exited {result.returncode}: {result.stderr.strip()[-300:]}",
                  flush=True)

    def clean_up(self) -> None:
        for project in self.projects:
            try:
                self.stop(project)
            except subprocess.TimeoutExpired as exc:
                print(f"   clean-up of {project} incomplete: {one_line(exc)}", flush=True)
        self.projects.clear()

    # 0. the first run: build and push into an empty registry -------------------------------------

    def first_run(self) -> list[Result]:
        wall, out = self._run("hello0")
        s = out["seconds"]
        return [Result("first run --cluster (new image built and pushed to an empty registry): whole command", wall,
                       "s", "-", None,
                       f"build {s['build']:.2f} s, push {s['push']:.2f} s, apply {s['apply']:.2f} s, "
                       f"ready {s['ready']:.2f} s, routes {s['routes']:.2f} s (the command's `seconds`); "
                       "the Docker build is cached from earlier runs on this machine; the control plane "
                       f"({NODES} hollow nodes) had started in {self.plane.started_in or 0:.1f} s")]

    # 1. objects applied, the image already pushed -------------------------------------------------

    def runs(self) -> list[Result]:
        walls: list[float] = []
        seconds: list[dict[str, float]] = []
        names = [f"hello{i}" for i in range(1, TIMED_RUNS + 1)]
        try:
            for name in names:
                wall, out = self._run(name)
                walls.append(wall)
                seconds.append(out["seconds"])
        finally:
            for name in names:  # the jobs of the status scenario are those of one project
                if name in self.projects:
                    self.stop(name)
                    self.projects.remove(name)
        applied = [s["apply"] + s["routes"] for s in seconds]
        median = _median(applied)
        per_run = "; ".join(f"{s['apply']:.2f} + {s['routes']:.2f}" for s in seconds)
        other = {step: _median([s[step] for s in seconds]) for step in ("build", "push", "ready")}
        python_s = self._python_start()
        return [
            Result(f"run --cluster: objects applied, image already pushed (median of {TIMED_RUNS})", median, "s",
                   f"< {APPLIED_TARGET_S:g}", median < APPLIED_TARGET_S,
                   f"`seconds.apply + seconds.routes` of `run --json`, from the end of the push to every object "
                   f"applied, the wait for readiness excluded; per run (apply + routes): {per_run}; a new project "
                   f"each run (1 job: ConfigMap, Deployment, Service, NetworkPolicy, the record, 2 Services and "
                   f"2 Ingresses)"),
            Result(f"... whole `run --cluster --json` command (median of {TIMED_RUNS})", _median(walls), "s", "-",
                   None, f"per run: {_seconds_list(walls)} s; medians of its steps: build {other['build']:.2f} s "
                         f"(cached), push {other['push']:.2f} s, ready {other['ready']:.2f} s; "
                         f"Python start + import of `mlserve --version` alone: {python_s:.2f} s"),
            Result("... the cluster's wait for the new pod to be ready (median)", other["ready"], "s", "-", None,
                   f"per run: {_seconds_list([s['ready'] for s in seconds])} s (scheduling, the hollow kubelet "
                   f"starting the pod and its probes; mlserve polls every 0.25 s)"),
            Result("... push of the rebuilt image to a new repository (median)", other["push"], "s", "-", None,
                   f"per run: {_seconds_list([s['push'] for s in seconds])} s (layers the registry has already, "
                   f"under another repository)"),
        ]

    def _python_start(self) -> float:
        walls = []
        for _ in range(STATUS_ROUNDS):
            started = time.perf_counter()
            subprocess.run([sys.executable, "-m", "mlserve", "--version"], env=self.ms.env, capture_output=True,
                           timeout=60, check=True)
            walls.append(time.perf_counter() - started)
        return _median(walls)

    # 2. scale 1 -> 10 -----------------------------------------------------------------------------

    def scale(self) -> list[Result]:
        _, jobs = self._status()
        before = len(self._project_jobs(jobs, "hello0"))
        if before != 1:
            raise BenchError(f"hello0 has {before} jobs, not 1, before the scale")
        since = time.time()
        wall, _ = self.ms.timed("scale", str(SCALE_TO), "--cluster", CLUSTER, "--project", "hello0",
                                timeout=READY_WAIT_S + 60)
        _, jobs = self._status()
        mine = self._project_jobs(jobs, "hello0")
        ready = sum(1 for j in mine if j["ready"])
        where = self._where_time_goes("hello0", since)
        print(f"   scale 1 -> {SCALE_TO}: {wall:.2f} s; {len(mine)} jobs, {ready} ready; {where}", flush=True)
        return [Result(f"scale 1 -> {SCALE_TO} --cluster: wall time of the command, to {SCALE_TO} ready jobs", wall,
                       "s", f"< {SCALE_TARGET_S:g}", wall < SCALE_TARGET_S and ready == SCALE_TO == len(mine),
                       f"`scale` returns when every new pod is ready; afterwards {len(mine)} jobs, {ready} ready "
                       f"(`status --cluster --json`); {where}")]

    def _pods(self, project: str) -> list[dict[str, Any]]:
        """The project's pods that are not being deleted, as the API server's JSON (read raw: the official
        client's models refuse some of what a 1.20 server sends)."""
        from kubernetes import client as k8s

        with self.plane.api_client() as api:
            answer = k8s.CoreV1Api(api).list_namespaced_pod(
                NAMESPACE, label_selector=f"mlserve.io/project={ProjectRef('bench', project).slug}", _preload_content=False)
            pods: list[dict[str, Any]] = json.loads(answer.data)["items"]
        return [p for p in pods if not p["metadata"].get("deletionTimestamp")]

    def _where_time_goes(self, project: str, since: float) -> str:
        """Pods per node, and from the pods' own timestamps (whole seconds) how long after ``since`` (a
        time.time()) the pods were created, scheduled and ready: the medians and the last."""
        since = float(int(since))  # the timestamps have whole seconds: counted from the second it began in
        pods = self._pods(project)
        nodes: dict[str, int] = {}
        steps: dict[str, list[float]] = {"created": [], "scheduled": [], "ready": []}
        for pod in pods:
            if pod["metadata"].get("creationTimestamp", "") < time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(since)):
                continue  # the job that was there before
            node = pod["spec"].get("nodeName") or "unscheduled"
            nodes[node] = nodes.get(node, 0) + 1
            steps["created"].append(_epoch(pod["metadata"]["creationTimestamp"]) - since)
            for condition in pod.get("status", {}).get("conditions") or []:
                kind = {"PodScheduled": "scheduled", "Ready": "ready"}.get(condition["type"])
                if kind and condition["status"] == "True":
                    steps[kind].append(_epoch(condition["lastTransitionTime"]) - since)
        timeline = "; ".join(f"{kind} at {_median(values):.0f} s (last {max(values):.0f} s)"
                             for kind, values in steps.items() if values)
        return (f"{sum(nodes.values())} new pods, per hollow node: "
                f"{', '.join(str(n) for _, n in sorted(nodes.items())) or 'none'}; from the command's start, "
                f"by the pods' timestamps (whole seconds, from the second it began in; median): {timeline or 'none'}")

    # 3. status with 30 jobs -----------------------------------------------------------------------

    def status(self) -> list[Result]:
        _, jobs = self._status()
        before = len(self._project_jobs(jobs, "hello0"))
        wanted = STATUS_JOBS - (len(jobs) - before)
        since = time.time()
        scaled_s, _ = self.ms.timed("scale", str(wanted), "--cluster", CLUSTER, "--project", "hello0",
                                    timeout=READY_WAIT_S + 60)
        where = self._where_time_goes("hello0", since)
        print(f"   scale -> {wanted}: {scaled_s:.2f} s; {where}", flush=True)
        walls: list[float] = []
        listed: list[tuple[int, int]] = []
        for _ in range(STATUS_ROUNDS):
            wall, jobs = self._status()
            walls.append(wall)
            listed.append((len(jobs), sum(1 for j in jobs if j["ready"])))
        median = _median(walls)
        complete = all(n == ready == STATUS_JOBS for n, ready in listed)
        print(f"   status: {_seconds_list(walls)} s; listed (jobs, ready): {listed}", flush=True)
        return [
            Result(f"status --cluster --json with {STATUS_JOBS} jobs: wall time of the command (median of "
                   f"{STATUS_ROUNDS})", median, "s", f"< {STATUS_TARGET_S:g}", median < STATUS_TARGET_S and complete,
                   f"per run: {_seconds_list(walls)} s (a new Python process each, as a user runs it); listed "
                   f"{listed[0][0]} jobs, {listed[0][1]} ready" + ("" if complete else f"; every run: {listed}")),
            Result(f"... scale {before} -> {wanted} --cluster: wall time of the command", scaled_s, "s", "-", None,
                   f"ready when it returned; {where}"),
        ]


def kube(work: Path) -> list[Result]:
    """The section: a control plane started, the scenarios in order (each runs whether the one before failed or
    not), every project stopped and the control plane stopped."""
    from tests.cluster.controlplane import start_for_tests

    work = work / "kube"
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    try:
        plane = start_for_tests(nodes=NODES)
    except Exception as exc:  # noqa: BLE001 - said in the row: the section cannot measure without it
        return [Result("Kubernetes control plane start (did not complete)", None, "", "-", False, one_line(exc))]
    print(f"   control plane ({NODES} hollow nodes) up in {time.monotonic() - started:.1f} s", flush=True)
    try:
        plane.namespace(NAMESPACE)
        with sandbox() as ms:
            ms.env["MLSERVE_CLUSTER_WAIT_S"] = str(READY_WAIT_S)
            ms("cluster", "add", CLUSTER, "--kubeconfig", str(plane.admin_kubeconfig), "--context", "admin",
               "--registry", f"{plane.registry}/ml", "--namespace", NAMESPACE, "--url", URL, timeout=60)
            bench = KubeBench(ms, plane, work)
            try:
                return run_scenarios([
                    ("first run", bench.first_run),
                    ("runs", bench.runs),
                    ("scale", bench.scale),
                    ("status", bench.status),
                ])
            finally:
                bench.clean_up()
    except Exception as exc:  # noqa: BLE001 - the set-up failing must still give a row
        return [Result("Kubernetes section set-up (did not complete)", None, "", "-", False, one_line(exc))]
    finally:
        plane.stop()
