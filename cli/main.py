"""The mlserve command line: each command parses options, builds one core object and calls it."""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from . import __version__, daemons
from .access import Access
from .config import NETWORKS, load_config
from .deploy import Deployer, RunRequest
from .edge import ALLOW_UNAUTHENTICATED, TLS_MODES, GatewayOptions, start_gateway
from .errors import MlserveError, UsageError
from .guard import ACCESS
from .instances import Instances
from .kube.cluster import chosen as cluster_choice
from .kube.cluster import make_target
from .kube.cluster import target as cluster_target
from .lookup import folder_project, resolve
from .platform import RUNTIMES, Platform
from .project import validate_project_name
from .reconcile import Reconciler
from .routing import Router
from .secrets import Secrets, check_name, read_value
from .traffic import Traffic
from .versions import Split, VersionView, set_traffic, split
from .views import status_views

if TYPE_CHECKING:
    from .kube.deploy import ClusterDeployer


class MlserveGroup(click.Group):
    """Turns every MlserveError into one message, an optional hint and its exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        debug = "--debug" in sys.argv[1:]
        try:
            return super().invoke(ctx)
        except MlserveError as exc:
            if debug:
                traceback.print_exc()
            click.secho(f"Error: {exc.message}", err=True, fg="red")
            if exc.hint:
                click.echo(exc.hint, err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            ctx.exit(130)


def _say(quiet: bool) -> Any:
    return (lambda message: click.echo(message, err=True)) if quiet else click.echo


def _platform(quiet: bool = False) -> Platform:
    return Platform(report=_say(quiet))


def _revived(quiet: bool = False) -> Platform:
    """The platform of a command that works with jobs: first the reconcile step, and the gateway and
    supervisor restored if jobs should be serving."""
    platform = _platform(quiet)
    for note in Reconciler(platform).revive():
        click.echo(f"Notice: {note}", err=True)
    return platform


def _emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True))


_cluster_option = click.option(
    "--cluster", envvar="MLSERVE_CLUSTER", metavar="NAME",
    help="On this Kubernetes cluster (`mlserve cluster add`; default: MLSERVE_CLUSTER, else mlserve.yml's cluster:).")


def _cluster(flag: str | None, quiet: bool = False) -> ClusterDeployer | None:
    """The cluster a command goes to (None: this machine; so does an empty --cluster or MLSERVE_CLUSTER)."""
    if flag is None and os.environ.get("MLSERVE_CLUSTER") == "":
        flag = ""
    name, by_config = cluster_choice(flag)
    if name is None:
        return None
    from .kube.deploy import ClusterDeployer

    platform = _platform(quiet)
    kube = ClusterDeployer(platform, cluster_target(platform.state, name))
    kube.named_by_config = by_config
    return kube


def _run_on_cluster(kube: ClusterDeployer, request: RunRequest, as_json: bool, follow: bool) -> None:
    done = kube.run(request)
    job = done.jobs[0]
    endpoints = {j.id: kube.endpoint(j.id) for j in done.jobs}
    name = f"{done.ref.key}/{job.number}"
    if as_json:
        _emit_json({"job": name, "id": job.id, "endpoint": endpoints[job.id], "cluster": kube.target.name,
                    "project_endpoint": kube.project_endpoint(done.ref), "runtime": "kubernetes",
                    "build": done.build, "image": done.image, "version": done.version,
                    "version_endpoint": kube.version_endpoint(done.ref, done.version),
                    "jobs": [{"job": f"{done.ref.key}/{j.number}", "id": j.id, "endpoint": endpoints[j.id]}
                             for j in done.jobs], "replaced": done.replaced, "access": "public",
                    "seconds": done.seconds})
    else:
        for other in done.jobs[1:]:
            click.echo(f"Also started {done.ref.key}/{other.number}: {endpoints[other.id]}")
        click.echo(f"\nJOB NAME (cluster {kube.target.name})\n{'-' * 38}\n{name}\n")
        click.echo(f"URL to service endpoint: {endpoints[job.id]}")
        click.echo(f"URL to project endpoint: {kube.project_endpoint(done.ref)}")
        click.echo(f"URL to version endpoint: {kube.version_endpoint(done.ref, done.version)} (version {done.version})")
        click.echo(_version_traffic(done.version, job.fallback, done.traffic))
        click.echo(f"\nTry: curl -F file=@<your file> {kube.project_endpoint(done.ref)}")
    if follow:
        for line in kube.logs(job.id, follow=True, tail=None):
            click.echo(line)


@click.group(cls=MlserveGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@click.version_option(__version__, prog_name="mlserve")
def cli(debug: bool) -> None:
    """Self-hosted serve mode: put a WSGI app behind an HTTP endpoint."""


@cli.command()
@click.argument("name", required=False)
@click.option("--dir", "folder", type=click.Path(file_okay=False, path_type=Path), default=Path("."),
              help="Initialize this folder instead of the current one; created if it does not exist.")
@click.option("--template", type=click.Choice(["flask", "wsgi", "fastapi", "website"]), default="flask",
              show_default=True, help="Flask app, plain WSGI function, FastAPI (ASGI) app, or Flask website with an upload form.")
@click.option("--force", is_flag=True, help="When there is no app.py: overwrite the template's files that exist.")
def init(name: str | None, folder: Path, template: str, force: bool) -> None:
    """Make this folder (or --dir DIR) the project NAME.

    NAME defaults to the project mlserve.yml names, else to the folder's name.

    \b
    With an app.py here already (a cloned repository, say): write mlserve.yml,
    or set `project: NAME` in it; app.py and all other files stay as they are.
    \b
    Without app.py: write a starting app from --template (app.py,
    requirements.txt, mlserve.yml, .mlserveignore); files that exist are not
    overwritten unless --force.
    """
    from .scaffold import init_project

    for line in init_project(folder, name, template=template, force=force).summary():
        click.echo(line)


@cli.command()
@click.argument("directory", default=".", type=click.Path(file_okay=False, path_type=Path))
def validate(directory: Path) -> None:
    """Check the app in DIRECTORY without building anything."""
    from .validate import validate_app

    load_config(directory)
    report = validate_app(directory)
    click.echo(f"{report.path}: {report.summary()}")


@cli.command(context_settings={"ignore_unknown_options": False})
@click.option("--mode", default="serve", show_default=True, help="Only `serve` is supported.")
@click.option("--env", help="Environment name (default: python 3.11) or any image reference with python3 and venv.")
@click.option("--data", multiple=True, metavar="SRC:MOUNT", help="Mount a local folder read-only at /MOUNT (repeatable).")
@click.option("--project", help="Project name (default: mlserve.yml's, else the folder's name).")
@click.option("--workers", type=click.IntRange(1, 64), help="uWSGI worker processes (default 2).")
@click.option("--runtime", type=click.Choice(RUNTIMES), help="Where instances run (default: docker when an engine answers).")
@click.option("--ca-bundle", type=click.Path(dir_okay=False), help="CA bundle pip trusts inside the build.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--max-runtime", metavar="DURATION", help="Stop the job after this long: 45m, 12h, 7d (default 7d; 0 for never).")
@click.option("--follow", "-f", is_flag=True, help="Follow the job's logs after it starts.")
@click.option("--replace", is_flag=True,
              help="Start as many jobs of the new version as the project has healthy ones, then drain and stop the old ones.")
@click.option("--canary", type=click.IntRange(0, 100), metavar="PERCENT",
              help="Start one job of the new version and give it PERCENT of the project endpoint's traffic.")
@click.option("--fallback", is_flag=True,
              help="The new version takes traffic only when no primary version has a healthy job.")
@click.option("--allow-data-outside", is_flag=True,
              help="Let mlserve.yml's data: mount folders outside the project folder (only for a mlserve.yml you trust).")
@click.option("--network", type=click.Choice(NETWORKS),
              help="What instances may reach (default isolated: the internet only; mlserve.yml's `network:` may "
                   "ask for none, and open only with this flag).")
@click.option("--access", type=click.Choice(ACCESS),
              help="Who may call the project: public (anyone) or token (default: mlserve.yml's `access:`, else "
                   "public while the gateway listens on loopback only and token once it is open).")
@_cluster_option
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def run(mode: str, env: str | None, data: tuple[str, ...], project: str | None, workers: int | None,
        runtime: str | None, ca_bundle: str | None, as_json: bool, max_runtime: str | None, follow: bool,
        replace: bool, canary: int | None, fallback: bool, allow_data_outside: bool, network: str | None,
        access: str | None, cluster: str | None, command: tuple[str, ...]) -> None:
    """Validate app.py here, build an image and serve it as a new version of the project, behind a
    unique endpoint, the project's endpoint and the version's endpoint."""
    if mode != "serve":
        raise UsageError(f"--mode {mode} is not supported", "mlserve serves apps: use `mlserve run --mode serve`.")
    if command:
        raise UsageError(
            f"serve mode takes no command (got {' '.join(command)!r})",
            "uWSGI runs the global `app` of app.py; remove the command.",
        )
    request = RunRequest(Path.cwd(), project, env, data, workers, runtime, ca_bundle, max_runtime, replace, canary,
                         fallback, allow_data_outside, network, access)
    if kube := _cluster(cluster, quiet=as_json):
        _run_on_cluster(kube, request, as_json, follow)
        return
    platform = _revived(quiet=as_json)
    deployment = Deployer(platform).run(request)
    job = deployment.jobs[0]
    if as_json:
        _emit_json({"job": job.name, "id": job.id, "endpoint": deployment.endpoints[job.id],
                    "project_endpoint": deployment.project_endpoint, "runtime": job.runtime, "build": deployment.build,
                    "version": deployment.version, "version_endpoint": deployment.version_endpoint,
                    "jobs": [{"job": j.name, "id": j.id, "endpoint": deployment.endpoints[j.id]} for j in deployment.jobs],
                    "replaced": [j.name for j in deployment.replaced], "access": deployment.access})
    else:
        for other in deployment.jobs[1:]:
            click.echo(f"Also started {other.name}: {deployment.endpoints[other.id]}")
        click.echo(f"\nJOB NAME\n{'-' * 38}\n{job.name}\n")
        click.echo(f"URL to service endpoint: {deployment.endpoints[job.id]}")
        click.echo(f"URL to project endpoint: {deployment.project_endpoint}")
        click.echo(f"URL to version endpoint: {deployment.version_endpoint} (version {deployment.version})")
        click.echo(_version_traffic(deployment.version, fallback, deployment.traffic))
        if deployment.access == "token":
            click.echo(f"Access: a bearer token is required (`mlserve token create --project {job.project}`).")
            click.echo(f"\nTry: curl -H 'Authorization: Bearer <token>' -F file=@<your file> {deployment.project_endpoint}")
        else:
            click.echo(f"\nTry: curl -F file=@<your file> {deployment.project_endpoint}")
    if follow:
        for line in platform.runtime(job.runtime).logs(job.id, job.handle, follow=True, tail=None):
            click.echo(line)


def _version_traffic(version: int, fallback: bool, traffic: Traffic) -> str:
    """What the new version takes of the project endpoint's traffic, in a sentence."""
    if fallback:
        return f"Version {version} is the fallback: it takes traffic only when no primary version has a healthy job."
    if traffic.shares is None:
        return f"Version {version} takes equal turns with every healthy job of the project."
    share = traffic.shares.get(version, 0)
    if share:
        return f"Version {version} takes {share}% of the project endpoint's traffic (`mlserve traffic` shows the split)."
    return (f"Version {version} takes no share of the project endpoint yet: the project splits traffic by version "
            "(`mlserve traffic --to-latest`, or `--to N=P`).")


def _project_or_folder(project: str | None) -> str:
    return validate_project_name(project) if project is not None else folder_project(Path.cwd())


@cli.command()
@click.argument("replicas", type=click.IntRange(0, 64), required=False)
@click.option("--add", type=click.IntRange(1, 64), help="Add K serving jobs instead of setting the total.")
@click.option("--project", help="Project to scale (default: this folder's).")
@click.option("--version", "version", type=click.IntRange(1), metavar="N",
              help="Scale only version N's jobs (default: the primary jobs; new ones copy the version with the most traffic).")
@_cluster_option
def scale(replicas: int | None, add: int | None, project: str | None, version: int | None, cluster: str | None) -> None:
    """Make the project have REPLICAS serving jobs. New jobs copy the version that takes the most
    traffic; scaling down stops jobs of the versions with the smallest share first, oldest first."""
    if (replicas is None) == (add is None):
        raise UsageError("give either REPLICAS or --add K", "e.g. `mlserve scale 3` or `mlserve scale --add 1`.")
    if kube := _cluster(cluster):
        name = _project_or_folder(project)
        live = kube.scale(name, replicas, add, version)
        click.echo(f"{kube.platform.owner}/projects/{name}: {len(live)} serving job(s) on cluster {kube.target.name}")
        for each in live:
            click.echo(f"  {each.name}  version {each.job.version}  {each.state}  {kube.endpoint(each.job.id)}")
        return
    platform = _revived()
    name = _project_or_folder(project)
    jobs = Deployer(platform).scale(platform.owner, name, replicas=replicas, add=add, version=version)
    click.echo(f"{platform.owner}/projects/{name}: {len(jobs)} serving job(s)")
    for job in jobs:
        click.echo(f"  {job.name}  version {job.version}  {platform.endpoint(job.id)}")


@cli.command("versions")
@click.argument("project", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
@_cluster_option
def versions_(project: str | None, as_json: bool, cluster: str | None) -> None:
    """List the versions of PROJECT (default: this folder's): when, image, jobs and traffic share."""
    if kube := _cluster(cluster, quiet=as_json):
        rows = kube.versions(_project_or_folder(project))
        if as_json:
            _emit_json(rows)
            return
        now = time.time()
        _table([[str(r["version"]), _ago(now - r["created"]) + " ago", r["image"], f"{r['healthy']}/{r['jobs']}",
                 "-" if r["fallback"] else f"{r['percent']:g}%", "fallback" if r["fallback"] else "", r["endpoint"]]
                for r in rows], ["VERSION", "CREATED", "IMAGE", "READY/JOBS", "TRAFFIC", "", "ENDPOINT"])
        return
    platform = _revived(quiet=as_json)
    name = _project_or_folder(project)
    current = split(platform, platform.owner, name)
    if as_json:
        _emit_json([{**v.as_dict(), "created": v.version.created_at, "image": v.version.spec.artifact.ref,
                     "endpoint": platform.version_endpoint(current.project_key, v.version.number)}
                    for v in current.versions])
        return
    now = time.time()
    _table([[str(v.version.number), _ago(now - v.version.created_at) + " ago", v.version.spec.artifact.ref,
             f"{v.healthy}/{v.jobs}", _percent(v), "fallback" if v.version.fallback else "",
             platform.version_endpoint(current.project_key, v.version.number)] for v in current.versions],
           ["VERSION", "CREATED", "IMAGE", "HEALTHY/JOBS", "TRAFFIC", "", "ENDPOINT"])
    _say_split(current)


@cli.command("traffic")
@click.argument("project", required=False)
@click.option("--to", "to", multiple=True, metavar="N=PERCENT", help="Give version N this percent (repeat; they sum to 100).")
@click.option("--to-latest", is_flag=True, help="Send all traffic to the newest primary version.")
@click.option("--by-jobs", is_flag=True, help="Back to equal turns for every healthy job, whatever its version.")
@click.option("--sticky/--no-sticky", default=None, help="Keep a browser on one version with a cookie (for websites).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
@_cluster_option
def traffic_(project: str | None, to: tuple[str, ...], to_latest: bool, by_jobs: bool, sticky: bool | None,
             as_json: bool, cluster: str | None) -> None:
    """Show or set how PROJECT's endpoint (default: this folder's) splits traffic between versions.
    Changes are live when the command returns, with no gateway reload."""
    if kube := _cluster(cluster, quiet=as_json):
        rows = kube.traffic(_project_or_folder(project), to, to_latest, by_jobs, sticky)
        if as_json:
            _emit_json(rows)
            return
        _table([[str(r["version"]), "-" if r["fallback"] else f"{r['percent']:g}%", f"{r['healthy']}/{r['jobs']}",
                 "fallback" if r["fallback"] else ""] for r in rows], ["VERSION", "TRAFFIC", "READY/JOBS", ""])
        return
    platform = _revived(quiet=as_json)
    name = _project_or_folder(project)
    if to or to_latest or by_jobs or sticky is not None:
        for note in set_traffic(platform, platform.owner, name, to, to_latest, by_jobs, sticky):
            click.echo(f"Notice: {note}", err=True)
    current = split(platform, platform.owner, name)
    if as_json:
        _emit_json([v.as_dict() for v in current.serving])
        return
    mode = "equal turns per healthy job" if current.traffic.by_jobs else "shares by version"
    click.echo(f"{current.project_key}: {mode}{', sticky (cookie)' if current.traffic.sticky else ''}")
    _table([[str(v.version.number), _percent(v), f"{v.healthy}/{v.jobs}", "fallback" if v.version.fallback else ""]
            for v in current.serving], ["VERSION", "TRAFFIC", "HEALTHY/JOBS", ""])
    _say_split(current)


def _percent(view: VersionView) -> str:
    """The share a version is set to take, and what it takes now when that differs."""
    text = "-" if view.version.fallback else f"{view.percent:g}%"
    return text if view.now == view.percent or (view.version.fallback and not view.now) else f"{text} (now {view.now:g}%)"


def _say_split(current: Split) -> None:
    if current.fallback_serving:
        click.echo(f"{current.project_key}: no primary version has a healthy job; the fallback is serving.")


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _table(rows: list[list[str]], headers: list[str]) -> None:
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *rows, strict=True)]
    for row in [headers, *rows]:
        click.echo("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


@cli.command("status")
@click.option("--all", "include_stopped", is_flag=True, help="Include stopped and failed jobs.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
@_cluster_option
def status(include_stopped: bool, as_json: bool, cluster: str | None) -> None:
    """List serving jobs with what really runs (alias: ps)."""
    if kube := _cluster(cluster, quiet=as_json):
        live = kube.jobs()
        if as_json:
            _emit_json([{"job": j.name, "id": j.job.id, "version": j.job.version, "fallback": j.job.fallback,
                         "ready": j.ready, "state": j.state, "restarts": j.restarts, "pod": j.pod,
                         "endpoint": kube.endpoint(j.job.id)} for j in live])
            return
        _table([[j.name, f"{j.job.version}{' (fallback)' if j.job.fallback else ''}", j.state[:60], str(j.restarts),
                 kube.endpoint(j.job.id)] for j in live], ["JOB NAME", "VERSION", "STATE", "RESTARTS", "ENDPOINT"])
        return
    platform = _revived(quiet=as_json)
    views, unreachable = status_views(platform, include_stopped)
    if as_json:
        _emit_json([v.as_dict() for v in views])
        return
    now = time.time()
    rows = [
        [v.job.name, f"{v.job.version}{' (fallback)' if v.fallback else ''}", _ago(now - v.job.created_at) + " ago", v.status, "healthy" if v.healthy else "-", _ago(v.uptime),
         _ago(v.expires_in), str(v.job.restarts), "-" if v.oom_kills is None else str(v.oom_kills), v.endpoint]
        for v in views
    ]
    _table(rows, ["JOB NAME", "VERSION", "CREATED", "STATUS", "HEALTH", "UPTIME", "TIME LEFT", "RESTARTS", "OOM KILLS",
                  "ENDPOINT"])
    for view in views:
        if view.job.reason and (view.status == "failed" or (view.job.active and not view.healthy)):
            click.echo(f"{view.job.name}: {view.job.reason.splitlines()[0]} (`mlserve info {view.job.name}` for more)")
        if view.oom_kills:
            click.echo(f"{view.job.name}: out of memory: {view.oom_kills} process(es) killed at its "
                       f"{view.job.spec.limits.memory_bytes >> 20} MiB limit since the instance started "
                       "(`limits: {memory: ...}` in mlserve.yml)")
    for owner, project in sorted({(v.job.owner, v.job.project) for v in views if v.fallback and v.job.active}):
        _say_split(split(platform, owner, project))
    for runtime, why in unreachable.items():
        click.echo(f"note: {runtime} instances could not be checked: {why}", err=True)


cli.add_command(status, "ps")


@cli.command()
@click.argument("job")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def info(job: str, as_json: bool) -> None:
    """Show one job: state, endpoints, settings, and the body limit and timeout in force."""
    from .views import worker_respawns

    platform = _revived(quiet=as_json)
    record = resolve(platform.state, platform.owner, job)
    views, _ = status_views(platform, include_stopped=True)
    view = next(v for v in views if v.job.id == record.id)
    gateway, spec = platform.gateway.settings, record.spec
    data = view.as_dict()
    data.update(
        project_endpoint=platform.project_endpoint(record.project_key),
        version_endpoint=platform.version_endpoint(record.project_key, record.version),
        workers=spec.workers,
        worker_respawns=worker_respawns(platform, record),
        data=[{"source": m.source, "mount": m.mount} for m in spec.mounts],
        limits={
            "gateway": {"body_limit_mb": gateway.body_limit_mb, "timeout_s": gateway.timeout_s},
            "uwsgi": {"body_limit_mb": spec.body_limit_mb, "timeout_s": spec.timeout_s},
        },
    )
    if as_json:
        _emit_json(data)
        return
    for key in ("job", "id", "version", "state", "healthy", "runtime", "image", "workers", "endpoint", "project_endpoint",
                "version_endpoint", "restarts"):
        click.echo(f"{key + ':':18}{data[key]}")
    unknown = "unknown" if view.job.active else "-"
    if view.oom_kills is None:
        click.echo(f"{'oom kills:':18}{unknown}")
    else:
        click.echo(f"{'oom kills:':18}{view.oom_kills} since the instance started (memory limit "
                   f"{spec.limits.memory_bytes >> 20} MiB)")
    click.echo(f"{'worker respawns:':18}{unknown if data['worker_respawns'] is None else data['worker_respawns']}")
    if record.reason:
        click.echo(f"{'reason:':18}" + record.reason.replace("\n", "\n" + " " * 18))
    click.echo(f"{'uptime:':18}{_ago(view.uptime)}")
    click.echo(f"{'time left:':18}{_ago(view.expires_in) if view.expires_in is not None else 'no limit'}")
    for mount in data["data"] or []:
        click.echo(f"{'data:':18}{mount['source']} -> {mount['mount']} (read-only)")
    limits = data["limits"]
    click.echo(f"{'body limit:':18}gateway {limits['gateway']['body_limit_mb']} MB, uwsgi {limits['uwsgi']['body_limit_mb']} MB")
    click.echo(f"{'timeout:':18}gateway {limits['gateway']['timeout_s']} s, uwsgi {limits['uwsgi']['timeout_s']} s")
    if limits["gateway"] != limits["uwsgi"]:
        click.echo("note: the gateway's limits changed after this job started; restart it to apply them.")


@cli.command()
@click.argument("job")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new lines.")
@click.option("--tail", type=click.IntRange(1), help="Only the last N lines.")
@_cluster_option
def logs(job: str, follow: bool, tail: int | None, cluster: str | None) -> None:
    """Print a job's logs."""
    if kube := _cluster(cluster):
        for line in kube.logs(job, follow, tail):
            click.echo(line)
        return
    platform = _revived()
    record = resolve(platform.state, platform.owner, job)
    for line in platform.runtime(record.runtime).logs(record.id, record.handle, follow=follow and record.active, tail=tail):
        click.echo(line)


@cli.command()
@click.argument("jobs", nargs=-1)
@click.option("--project", help="Stop every job of this project.")
@click.option("--all", "stop_all", is_flag=True, help="Stop every job.")
@_cluster_option
def stop(jobs: tuple[str, ...], project: str | None, stop_all: bool, cluster: str | None) -> None:
    """Stop jobs gracefully: they leave the rotation, in-flight requests finish."""
    if sum(map(bool, (jobs, project, stop_all))) != 1:
        raise UsageError("name jobs, or --project P, or --all", "e.g. `mlserve stop 5` or `mlserve stop --project style-transfer`.")
    if kube := _cluster(cluster):
        names = kube.stop(jobs, _project_or_folder(project) if project is not None else None, stop_all)
        click.echo(f"Stopped on cluster {kube.target.name}: {', '.join(names)}" if names
                   else "Nothing to stop: no such job is running.")
        return
    platform = _revived()
    state = platform.state
    if stop_all:
        targets = state.jobs(active_only=True)
    elif project is not None:
        targets = state.jobs(active_only=True, owner=platform.owner, project=_project_or_folder(project))
    else:
        targets = [resolve(state, platform.owner, ref) for ref in jobs]
    stopped = Instances(platform).stop(targets)
    if stop_all:
        Reconciler(platform).converge()  # instances no job claims go too
    if not stopped:
        click.echo("Nothing to stop: no such job is running.")


@cli.group()
def secret() -> None:
    """Manage a project's secrets: environment variables its instances get, never in an image or output."""


_secret_project = click.option("--project", help="The project (default: this folder's).")
_RUNNING_JOBS_KEEP = ("jobs running now keep the environment they started with until they are replaced "
                      "(`mlserve run --replace`).")


def _secrets(project: str | None) -> Secrets:
    platform = _platform()
    return Secrets(platform.home, platform.owner, _project_or_folder(project))


@secret.command("set")
@click.argument("name")
@_secret_project
def secret_set(name: str, project: str | None) -> None:
    """Set secret NAME of the project to the value read from stdin (one trailing newline is dropped):
    `echo "$TOKEN" | mlserve secret set API_TOKEN`. Asks for it, hidden, when stdin is a terminal."""
    store = _secrets(project)
    check_name(name)  # before waiting for a value
    stdin = click.get_binary_stream("stdin")
    raw = (click.prompt(f"Value of {name}", hide_input=True, err=True).encode() if stdin.isatty()
           else read_value(stdin))
    replaced = store.set(name, raw)
    click.echo(f"Secret {name} {'updated' if replaced else 'set'} for {store.project_key}.")
    click.echo(f"Jobs started from now on get it (`mlserve run`, `mlserve scale`); {_RUNNING_JOBS_KEEP}")


@secret.command("list")
@_secret_project
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
def secret_list(project: str | None, as_json: bool) -> None:
    """List the project's secrets by name, with when each was set (never their values)."""
    store = _secrets(project)
    secrets = store.list_all()
    if as_json:
        _emit_json([s.as_dict() for s in secrets])
    elif not secrets:
        click.echo(f"{store.project_key} has no secrets (`mlserve secret set NAME` adds one).")
    else:
        now = time.time()
        _table([[s.name, _ago(now - s.set_at) + " ago"] for s in secrets], ["NAME", "SET"])


@secret.command("delete")
@click.argument("name")
@_secret_project
def secret_delete(name: str, project: str | None) -> None:
    """Delete secret NAME of the project."""
    store = _secrets(project)
    store.delete(name)
    click.echo(f"Secret {name} deleted from {store.project_key}.")
    click.echo(f"Jobs started from now on do not get it; {_RUNNING_JOBS_KEEP}")


@cli.group()
def gateway() -> None:
    """Manage the nginx gateway."""


@gateway.command("start")
@click.option("--host", metavar="ADDR",
              help="Listen on this address (default 127.0.0.1; 0.0.0.0 for every address of this machine). "
                   "Beyond loopback it needs TLS.")
@click.option("--port", type=click.IntRange(1, 65535), help="Port to listen on (default 8000).")
@click.option("--public-url", metavar="URL",
              help="How clients reach the gateway (a DNS name, a proxy); every endpoint mlserve prints starts "
                   "with it. '' forgets it.")
@click.option("--tls", "tls_mode", type=click.Choice(TLS_MODES),
              help="self-signed: a certificate for this machine's names and addresses, from a local CA whose "
                   "file is printed; off: plain HTTP (loopback only).")
@click.option("--tls-cert", type=click.Path(dir_okay=False, path_type=Path), help="Your certificate (PEM, with its chain).")
@click.option("--tls-key", type=click.Path(dir_okay=False, path_type=Path), help="Its private key (PEM).")
@click.option("--allow-unauthenticated", is_flag=True,
              help="Serve projects that say `access: public` to anyone on the network (off the network they "
                   "are public anyway).")
@click.option("--body-limit", type=click.IntRange(1), help="Largest request body in MB (default 100).")
@click.option("--timeout", type=click.IntRange(1), help="Request timeout in seconds (default 60).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object: url, ca_file.")
def gateway_start(host: str | None, port: int | None, public_url: str | None, tls_mode: str | None,
                  tls_cert: Path | None, tls_key: Path | None, allow_unauthenticated: bool, body_limit: int | None,
                  timeout: int | None, as_json: bool) -> None:
    """Start (or reconfigure) the gateway, with routes from the state.

    \b
    Open it to the network with TLS; projects then need tokens unless they
    say `access: public` and you pass --allow-unauthenticated:
      mlserve gateway start --host 0.0.0.0 --tls self-signed
      mlserve token create --project hello
    """
    env_port = os.environ.get("MLSERVE_GATEWAY_PORT")
    if port is not None and env_port and env_port != str(port):
        raise UsageError(f"MLSERVE_GATEWAY_PORT={env_port} is set and decides the port, not --port {port}",
                         "Unset MLSERVE_GATEWAY_PORT, or set it to the port you want.")
    platform = _platform(quiet=as_json)
    started = start_gateway(platform, GatewayOptions(host, port, body_limit, timeout, public_url, tls_mode, tls_cert,
                                                     tls_key, allow_unauthenticated))
    daemons.ensure_running(platform.home)
    if as_json:
        _emit_json({"url": started.url, "ca_file": started.ca_file, "tls": started.tls,
                    "network": not started.loopback})
        return
    click.echo(f"Gateway listening on {started.url}")
    if started.ca_file:
        click.echo(f"Its certificate is signed by mlserve's local CA: clients trust {started.ca_file} "
                   "(`curl --cacert FILE`, REQUESTS_CA_BUNDLE=FILE).")
    if not started.loopback:
        click.echo("Open to the network: projects need a token (`mlserve token create --project P`) unless they say "
                   "`access: public`" + (" (allowed)." if platform.state.get_setting(ALLOW_UNAUTHENTICATED) else "."))


@gateway.command("stop")
def gateway_stop() -> None:
    """Stop the gateway (jobs keep running; endpoints stop answering)."""
    platform = _platform()
    daemons.stop(platform.home)  # first, or it would bring the gateway back
    with platform.state.lock():
        Router(platform).stop_gateway()
    click.echo("Gateway stopped. `mlserve gateway start` brings it back; until then no command does.")


@gateway.command("status")
@click.option("--json", "as_json", is_flag=True)
def gateway_status(as_json: bool) -> None:
    """Show whether the gateway runs, where, and how many routes it has."""
    platform = _platform()
    home, status_ = platform.home, platform.gateway.status()
    watcher, beat = daemons.pid(home), daemons.heartbeat(home)
    data = {"running": status_.running, "pid": status_.pid, "url": status_.url, "config": str(status_.config),
            "routes": status_.routes, "stopped_by_user": Router(platform).stopped_by_user,
            "orphans": list(status_.orphans),
            "supervisor": {"running": watcher is not None, "pid": watcher,
                           "last_round_s_ago": round(beat.age_s, 1) if beat is not None else None,
                           "last_round_problems": beat.problems if beat is not None else []}}
    if as_json:
        _emit_json(data)
        return
    click.echo(f"gateway: {'running' if status_.running else 'stopped'} (pid {status_.pid}) at {status_.url}, {status_.routes} route(s)")
    if status_.orphans:
        click.echo(f"  leftover nginx processes without their master: {' '.join(map(str, status_.orphans))} "
                   "(the next command that starts the gateway removes them)")
    if watcher is not None:
        click.echo(f"supervisor: running (pid {watcher}), last round {beat.age_s:.1f}s ago" if beat is not None
                   else f"supervisor: running (pid {watcher})")
        for problem in beat.problems if beat is not None else []:
            click.echo(f"  problem in the last round: {problem}")
    else:
        click.echo("supervisor: not running (any mlserve command that finds jobs serving starts it)")


@cli.group()
def token() -> None:
    """Bearer tokens for projects that require them (access: token)."""


@token.command("create")
@click.option("--project", help="The project the token calls (default: this folder's).")
@click.option("--name", help="A name to list and revoke it by (default token-N).")
@click.option("--expires", metavar="DURATION", help="Refused after this long: 12h, 30d (default: never).")
@click.option("--rate", metavar="RATE", help="This token's own limit, such as 10/s (on top of the project's).")
@click.option("--burst", type=click.IntRange(1), help="Requests the token may send at once (default: a second's worth).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object: name, token, expires.")
def token_create(project: str | None, name: str | None, expires: str | None, rate: str | None, burst: int | None,
                 as_json: bool) -> None:
    """Make a token and print it once (only its hash is kept). Clients send `Authorization: Bearer TOKEN`."""
    platform = _platform(quiet=as_json)
    made = Access(platform).create_token(platform.owner, _project_or_folder(project), name, expires, rate, burst)
    expires_at = made.token.expires_at
    if as_json:
        _emit_json({"name": made.token.name, "token": made.secret, "project": made.token.project_key,
                    "expires": _iso(expires_at) if expires_at else None})
        return
    click.echo(f"Token {made.token.name} for {made.token.project_key}"
               f"{f' (expires {_iso(expires_at)})' if expires_at else ''}; it is shown only this once:")
    click.echo(made.secret)
    click.echo(f"curl -H 'Authorization: Bearer {made.secret}' {platform.project_endpoint(made.token.project_key)}")


@token.command("list")
@click.option("--project", help="Only this project's tokens (default: every project's).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
def token_list(project: str | None, as_json: bool) -> None:
    """List tokens: name, project, status, created, expires (never the token)."""
    platform = _platform(quiet=as_json)
    now = time.time()
    tokens = Access(platform).tokens(platform.owner, validate_project_name(project) if project else None)
    rows = [{"name": t.name, "project": t.project_key, "status": t.status(now), "created": _iso(t.created_at),
             "expires": _iso(t.expires_at) if t.expires_at else None,
             "rate": t.rate.describe() if t.rate else None} for t in tokens]
    if as_json:
        _emit_json(rows)
        return
    _table([[str(r["name"]), str(r["project"]), str(r["status"]), str(r["created"]), str(r["expires"] or "never"),
             str(r["rate"] or "-")] for r in rows],
           ["NAME", "PROJECT", "STATUS", "CREATED", "EXPIRES", "RATE"])


@token.command("revoke")
@click.argument("name")
@click.option("--project", help="The token's project (default: this folder's).")
def token_revoke(name: str, project: str | None) -> None:
    """Revoke the token NAME: refused from the next request on, without a gateway reload."""
    platform = _platform()
    revoked = Access(platform).revoke(platform.owner, _project_or_folder(project), name)
    click.echo(f"Token {revoked.name} of {revoked.project_key} revoked.")


@cli.command("access")
@click.argument("access", type=click.Choice(ACCESS), required=False)
@click.option("--project", help="Project (default: this folder's).")
def access_(access: str | None, project: str | None) -> None:
    """Show or set who may call a project: `public` (anyone) or `token` (a bearer token from
    `mlserve token create`). Live from the next request; the next `run` applies mlserve.yml's again."""
    platform = _platform()
    name = _project_or_folder(project)
    guard = (Access(platform).set_access(platform.owner, name, access) if access
             else platform.state.guard(platform.owner, name))
    key = f"{platform.owner}/projects/{name}"
    effective = guard.effective_access(platform.gateway.settings.loopback)
    click.echo(f"{key}: {effective}" + ("" if guard.access else " (as the gateway: public on loopback, token once open)"))
    if guard.rate:
        click.echo(f"  rate limit: {guard.rate.describe()}")
    if guard.cors:
        click.echo(f"  CORS origins: {', '.join(guard.cors.origins)}")


def _iso(when: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))


@cli.group()
def cluster() -> None:
    """Kubernetes clusters that `run`, `scale`, `status`, `logs`, `traffic` and `stop` can target (--cluster)."""


@cluster.command("add")
@click.argument("name")
@click.option("--kubeconfig", type=click.Path(dir_okay=False, path_type=Path),
              help="The kubeconfig (default: $KUBECONFIG, else ~/.kube/config).")
@click.option("--context", help="Its context (default: its current context).")
@click.option("--registry", required=True, help="Where images are pushed and nodes pull them: host[:port]/path.")
@click.option("--namespace", help="The namespace jobs go to (default: the context's, else default).")
@click.option("--url", required=True, help="The address the cluster's ingress answers at: endpoints start with it.")
@click.option("--ingress-class", default="nginx", show_default=True, help="The IngressClass of an ingress-nginx controller.")
def cluster_add(name: str, kubeconfig: Path | None, context: str | None, registry: str, namespace: str | None,
                url: str, ingress_class: str) -> None:
    """Check that the cluster answers with these credentials and namespace, then remember it as NAME."""
    platform = _platform()
    found = make_target(name, kubeconfig, context, registry, namespace, url, ingress_class)
    replaced = platform.state.cluster(name) is not None
    platform.state.add_cluster(found)
    click.echo(f"Cluster {name} {'updated' if replaced else 'added'}: context {found.context}, namespace "
               f"{found.namespace}, images to {found.registry}, endpoints at {found.url}.")
    click.echo(f"Deploy with `mlserve run --mode serve --cluster {name}`.")


@cluster.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
def cluster_list(as_json: bool) -> None:
    """The clusters added, with where their jobs and images go."""
    targets = _platform().state.clusters()
    if as_json:
        _emit_json([{"name": t.name, "kubeconfig": t.kubeconfig, "context": t.context, "registry": t.registry,
                     "namespace": t.namespace, "url": t.url, "ingress_class": t.ingress_class} for t in targets])
        return
    _table([[t.name, t.context or "(current)", t.namespace, t.registry, t.url] for t in targets],
           ["NAME", "CONTEXT", "NAMESPACE", "REGISTRY", "URL"])


@cluster.command("remove")
@click.argument("name")
@click.option("--force", is_flag=True, help="Forget it even if mlserve jobs still run there (or it cannot be asked).")
def cluster_remove(name: str, force: bool) -> None:
    """Forget the cluster NAME. Nothing on the cluster changes; jobs that run there are refused unless --force."""
    from .kube.api import ClusterError
    from .kube.deploy import ClusterDeployer

    platform = _platform()
    found = cluster_target(platform.state, name)
    if not force:
        try:
            running = ClusterDeployer(platform, found).jobs()
        except ClusterError as exc:
            raise UsageError(f"cannot ask cluster {name} for its jobs: {exc.message}",
                             "Forget it anyway with `--force`.") from None
        if running:
            raise UsageError(f"{len(running)} mlserve job(s) still run on cluster {name}",
                             f"Stop them first (`mlserve stop --all --cluster {name}`) or forget it with `--force`.")
    platform.state.remove_cluster(name)
    click.echo(f"Cluster {name} removed.")


@cli.command()
def setup() -> None:
    """Install and start what mlserve needs on this machine (Debian, as root): nginx, Docker, a base image."""
    from .host import setup as host_setup

    host_setup(click.echo)
