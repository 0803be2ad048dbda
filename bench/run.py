"""mlserve benchmarks: gateway efficiency, uploads, deploy/redeploy/scale times, memory.

Run with `make bench` (or `python3 bench/run.py`). Everything goes to loopback, bounded in
time. Prints a table and writes bench/RESULTS.md with the machine it ran on. Ratios are measured
in one run, because these machines are shared and noisy.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import docker

BENCH = Path(__file__).resolve().parent
APPS = BENCH / "apps"
WRK_SECONDS = int(os.environ.get("BENCH_WRK_SECONDS", "8"))
WRK_CONNECTIONS = 16


@dataclass
class Result:
    name: str
    value: float
    unit: str
    target: str
    ok: bool


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Mlserve:
    def __init__(self) -> None:
        self.home = Path(tempfile.mkdtemp(prefix="mlb", dir="/tmp"))
        self.port = free_port()
        self.env = {**os.environ, "MLSERVE_HOME": str(self.home), "MLSERVE_GATEWAY_PORT": str(self.port),
                    "MLSERVE_OWNER": "bench"}

    def __call__(self, *args: str, cwd: Path | None = None) -> str:
        out = subprocess.run([sys.executable, "-m", "mlserve", *args], cwd=cwd, env=self.env,
                             capture_output=True, text=True, timeout=900)
        if out.returncode != 0:
            raise SystemExit(f"mlserve {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}")
        return out.stdout

    def timed(self, *args: str, cwd: Path | None = None) -> tuple[float, str]:
        started = time.perf_counter()
        out = self(*args, cwd=cwd)
        return time.perf_counter() - started, out

    def close(self) -> None:
        subprocess.run([sys.executable, "-m", "mlserve", "stop", "--all"], env=self.env, capture_output=True)
        subprocess.run([sys.executable, "-m", "mlserve", "gateway", "stop"], env=self.env, capture_output=True)
        shutil.rmtree(self.home, ignore_errors=True)


def wrk(url: str) -> float:
    out = subprocess.run(["wrk", "-t2", f"-c{WRK_CONNECTIONS}", f"-d{WRK_SECONDS}s", url],
                         capture_output=True, text=True, timeout=WRK_SECONDS + 30).stdout
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if not match or errors:
        raise SystemExit(f"wrk against {url} failed:\n{out}")
    return float(match.group(1))


def direct_uwsgi_rps(app_dir: Path) -> float:
    """The same app under `uwsgi --http-socket` with 2 processes on the host: the baseline."""
    port = free_port()
    process = subprocess.Popen(
        ["uwsgi", "--http-socket", f"127.0.0.1:{port}", "--master", "--processes", "2",
         "--wsgi-file", str(app_dir / "app.py"), "--disable-logging", "--die-on-term"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        return wrk(url)
    finally:
        process.terminate()
        process.wait(timeout=30)


def container_pids(client: docker.DockerClient, home: Path, project: str) -> list[int]:
    pids = []
    for container in client.containers.list(filters={"label": [f"io.mlserve.home={home}", f"io.mlserve.project={project}"]}):
        top = container.top(ps_args="-o pid,comm")
        pids += [int(row[0]) for row in top["Processes"] if "uwsgi" in row[1]]
    return pids


def proc_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def nginx_pids(home: Path) -> list[int]:
    master = int((home / "gateway" / "nginx.pid").read_text().split()[0])
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    return [master, *map(int, children)]


def curl_upload(path: Path, url: str) -> float:
    out = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{time_total} %{http_code}", "-F", f"file=@{path}", url],
                         capture_output=True, text=True, timeout=120).stdout.split()
    if out[1] != "200":
        raise SystemExit(f"upload to {url} answered {out[1]}")
    return float(out[0])


def main() -> int:
    client = docker.from_env()
    work = Path(tempfile.mkdtemp(prefix="mlbench"))
    ms = Mlserve()
    results: list[Result] = []
    try:
        hello = work / "hello"
        shutil.copytree(APPS / "hello", hello)
        ms("run", "--mode", "serve", cwd=hello)  # warms the image cache
        ms("stop", "--all")

        seconds, out = ms.timed("run", "--mode", "serve", "--json", cwd=hello)
        deployed = json.loads(out)
        results.append(Result("run --mode serve to healthy (warm caches)", seconds, "s", "<= 5", seconds <= 5))

        subprocess.run(["curl", "-s", "-o", "/dev/null", deployed["project_endpoint"]], check=True)
        rss = sum(proc_kb(pid, "VmRSS") for pid in container_pids(client, ms.home, "bench/projects/hello")) / 1024
        results.append(Result("idle instance RSS (master + 2 workers)", rss, "MB", "<= 60", rss <= 60))

        through = wrk(deployed["project_endpoint"])
        direct = direct_uwsgi_rps(hello)
        ratio = through / direct
        results.append(Result("gateway req/s (project endpoint, 1 job)", through, "req/s", "-", True))
        results.append(Result("direct uwsgi --http-socket req/s", direct, "req/s", "-", True))
        results.append(Result("gateway efficiency (ratio)", ratio, "", ">= 0.70", ratio >= 0.70))

        blob = work / "5mb.bin"
        blob.write_bytes(os.urandom(5 * 1024 * 1024))
        times = [curl_upload(blob, deployed["project_endpoint"]) for _ in range(10)]
        median = statistics.median(times)
        results.append(Result("curl -F 5 MB through the project endpoint (median of 10)", median, "s", "<= 0.15", median <= 0.15))

        app = hello / "app.py"
        app.write_text(app.read_text().replace("hello world", "hello again"))
        seconds, _ = ms.timed("run", "--mode", "serve", cwd=hello)
        results.append(Result("redeploy after a code-only change", seconds, "s", "<= 5", seconds <= 5))

        ms("scale", "1", "--project", "hello")
        seconds, _ = ms.timed("scale", "4", "--project", "hello")
        results.append(Result("scale 1 -> 4, all answering", seconds, "s", "<= 10", seconds <= 10))
        ms("stop", "--all")

        upload_app = work / "upload"
        shutil.copytree(APPS / "upload", upload_app)
        deployed = json.loads(ms("run", "--mode", "serve", "--json", cwd=upload_app))
        big = work / "90mb.bin"
        with open(big, "wb") as handle:
            for _ in range(90):
                handle.write(os.urandom(1024 * 1024))
        pids = nginx_pids(ms.home) + container_pids(client, ms.home, "bench/projects/upload")
        before = {pid: proc_kb(pid, "VmHWM") for pid in pids}
        answer = subprocess.run(["curl", "-s", "-F", f"file=@{big}", deployed["project_endpoint"]],
                                capture_output=True, text=True, timeout=300).stdout
        assert json.loads(answer)["bytes"] > 90 * 1024 * 1024, answer
        growth = max((proc_kb(pid, "VmHWM") - before[pid]) / 1024 for pid in pids)
        results.append(Result("90 MB upload: largest peak-RSS growth of any process", growth, "MB", "<= 30", growth <= 30))
    finally:
        ms.close()
        shutil.rmtree(work, ignore_errors=True)

    report(results)
    return 0 if all(r.ok for r in results) else 1


def report(results: list[Result]) -> None:
    lines = ["| benchmark | measured | target | met |", "| --- | --- | --- | --- |"]
    for r in results:
        value = f"{r.value:.2f} {r.unit}".strip() if r.value < 100 else f"{r.value:.0f} {r.unit}"
        lines.append(f"| {r.name} | {value} | {r.target} | {'yes' if r.ok else 'NO'} |")
    table = "\n".join(lines)
    print(table)
    machine = (
        f"{platform.platform()}, {os.cpu_count()} cores, "
        f"{round(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30)} GiB, Python {platform.python_version()}"
    )
    (BENCH / "RESULTS.md").write_text(
        "# Benchmark results\n\n"
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {machine}, "
        f"with wrk -t2 -c{WRK_CONNECTIONS} -d{WRK_SECONDS}s on loopback (`make bench`).\n\n{table}\n"
    )


if __name__ == "__main__":
    raise SystemExit(main())
