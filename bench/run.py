"""mlserve benchmarks: speed (issue 2), self-healing under load and faults (issue 3), routing without
reloads (issue 8), versions and traffic splits (replace, canary, fallback), the guarded edge (issue 9:
TLS and tokens, revocations and rate limits under load), and Kubernetes (issue 10: run, scale and status on a
cluster, a local control plane with hollow nodes).

Run with `make bench` (or `python3 bench/run.py`); add `--engine-restart` to also restart the
Docker engine (it disturbs every container on the machine, so it is off by default). `--only SECTION`
(repeatable) runs some sections only: speed, healing, routing, versions, edge, kube, or efficiency (the gateway
efficiency rows of the speed section alone; the section's other rows are carried over). Everything
goes to loopback, bounded in time. Prints the tables and writes bench/RESULTS.md with the machine
it ran on. Ratios are measured in one run, interleaved, because these machines are shared and noisy.

Notes written by hand below the NOTES_MARKER line of RESULTS.md are kept across runs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

# Run as a script, Python puts bench/ on sys.path (the modules beside this one) but not the repo root,
# where tests/harness.py has the helpers that the benchmarks share with the integration tests.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import docker
import edge
import kube
import report
import routing
import versions
from faults import self_healing
from report import HEALING, ROUTING, SPEED, VERSIONS, machine, write_report
from results import Section
from speed import WRK_CONNECTIONS, WRK_ROUNDS, WRK_SECONDS, efficiency, speed

from mlserve.constants import LABEL_HOME

# report.TITLES orders RESULTS.md's sections and names the ones it keeps; the edge section comes next, then
# Kubernetes. (They belong in report.py's TITLES; added here until report.py lists them.)
for _title in (edge.EDGE, kube.KUBE):
    if _title not in report.TITLES:
        report.TITLES = (*report.TITLES, _title)  # type: ignore[assignment]


def _others(client: docker.DockerClient, homes: set[str]) -> int:
    """Running containers that belong to no home in ``homes``: the machine's other load."""
    try:
        return sum(1 for c in client.containers.list() if c.labels.get(LABEL_HOME) not in homes)
    except docker.errors.DockerException:
        return -1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine-restart", action="store_true",
                        help="also restart the Docker engine (disturbs every container on this machine)")
    parser.add_argument("--only", action="append",
                        choices=["speed", "healing", "routing", "versions", "edge", "kube", "efficiency"],
                        help="run this section only; repeat for several (efficiency: the gateway efficiency "
                             "rows of the speed section)")
    args = parser.parse_args()
    only = set(args.only or ["speed", "healing", "routing", "versions", "edge", "kube"])

    client = docker.from_env()
    work = Path(tempfile.mkdtemp(prefix="mlbench"))
    started = time.gmtime()
    load_before = os.getloadavg()
    others = _others(client, set())
    machine_line = machine()
    sections: list[Section] = []
    try:
        if "speed" in only:
            sections.append(Section(SPEED, speed(client, work)))
        elif "efficiency" in only:
            sections.append(Section(SPEED, efficiency(client, work), partial=True))
        if "healing" in only:
            sections.append(Section(HEALING, self_healing(client, work, args.engine_restart)))
        if "routing" in only:
            sections.append(Section(ROUTING, routing.routing(client, work)))
        if "versions" in only:
            sections.append(Section(VERSIONS, versions.versions(client, work)))
        if "edge" in only:
            sections.append(Section(edge.EDGE, edge.edge(client, work)))
        if "kube" in only:
            sections.append(Section(kube.KUBE, kube.kube(work)))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load_after = os.getloadavg()
    loads = []
    if only & {"speed", "efficiency"}:
        loads.append(f"wrk -t2 -c{WRK_CONNECTIONS} -d{WRK_SECONDS}s (x{WRK_ROUNDS}, interleaved) for throughput")
    if "healing" in only:
        loads.append("4 Python threads of sequential GETs for the fault scenarios")
    if "routing" in only:
        loads.append(f"for routing, each client alone through each change: wrk -t2 -c{routing.WRK_CONNECTIONS} "
                     f"-d{routing.WRK_SECONDS}s (keep-alive, no retries) and {routing.SESSION_THREADS} threads of a "
                     f"requests.Session with max_retries=0, then batches of {routing.FRESH_CONNECTIONS} GETs on fresh "
                     f"connections after each `scale`")
    if "versions" in only:
        loads.append(f"for versions, each client alone through each change: wrk -t2 -c{routing.WRK_CONNECTIONS} "
                     f"(keep-alive, no retries; stopped {versions.SETTLE_S} s after the change) and "
                     f"{versions.SESSION_THREADS} threads of a requests.Session with max_retries=0; "
                     f"{versions.CANARY_REQUESTS} GETs from {versions.SESSION_THREADS} keep-alive sessions for the "
                     f"canary share; one GET on keep-alive connections held on every gateway worker plus "
                     f"{versions.FRESH_CONNECTIONS} on fresh connections after each `traffic`")
    if "edge" in only:
        loads.append(f"for the edge, wrk -t2 -c{WRK_CONNECTIONS} -d{WRK_SECONDS}s (x{WRK_ROUNDS} each way, "
                     f"interleaved) with a bearer token, plain HTTP against HTTPS; then over HTTPS "
                     f"{edge.SESSION_THREADS} threads of a requests.Session (token B, max_retries=0) beside one "
                     f"session each for the revoked token, the newly limited project and the new token")
    if "kube" in only:
        loads.append(f"for Kubernetes, no request load: a control plane on loopback (kube-apiserver, controller "
                     f"manager and scheduler 1.20, etcd, {kube.NODES} hollow kubemark nodes, docker-registry) started "
                     f"for the section; commands timed as whole processes")
    context = (
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', started)} on {machine_line}.\n\n"
        f"Load: {'; '.join(loads)}; loopback only, every load bounded in time. "
        f"Command: `{' '.join(['python3 bench/run.py', *sys.argv[1:]])}`.\n\n"
        f"The machine was shared: load average {load_before[0]:.1f} at the start and {load_after[0]:.1f} at the end, "
        f"{others} other containers running when it began."
    )
    write_report(sections, context, args.engine_restart)
    return 0 if all(r.ok is not False for s in sections for r in s.results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
