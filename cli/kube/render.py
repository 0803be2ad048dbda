"""What a project becomes on a Kubernetes cluster: each mapping decision is one pure function of the
job spec, returning the object as the API takes it (tests compare them exactly).

- A job is a Deployment of one replica (Kubernetes places, restarts and probes it), a Service of its
  own (its unique endpoint) and a ConfigMap with its uwsgi.ini and manifest: the image's own uWSGI
  runs with that ini.
- The project endpoint, each version endpoint and the fallback are Services selecting jobs by label.
- Routes are ingress-nginx Ingress objects; a share between two versions is a canary Ingress with a
  weight; the fallback is the project route's default backend (taken when its Service has no ready
  endpoint). Nothing strips a prefix: the instance knows its prefixes (MLSERVE_PREFIXES).
- Pods are locked down as local containers are; a NetworkPolicy keeps the same egress rule.
- Labels are the truth: every object carries the project's label, a job's objects its job label.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..constants import (
    CONTAINER_UID,
    INSTANCE_APP_DIR,
    INSTANCE_OUTPUT_DIR,
    INSTANCE_RUN_DIR,
    INSTANCE_VENV,
    LOAD_GRACE_S,
    MANIFEST_NAME,
    RESTART_AFTER_FAILURES,
    SOCKET_DIR,
    SOCKET_NAME,
    STATS_SOCKET_NAME,
    UWSGI_INI_NAME,
)
from ..firewall import BLOCKED
from ..runtimes import UwsgiSettings, instance_environment, uwsgi_ini
from ..spec import JobSpec

MANAGED = {"app.kubernetes.io/managed-by": "mlserve"}
LABEL_PROJECT = "mlserve.io/project"
LABEL_JOB = "mlserve.io/job"
LABEL_VERSION = "mlserve.io/version"
LABEL_NUMBER = "mlserve.io/number"
LABEL_ROLE = "mlserve.io/role"  # of a job's objects: primary | fallback
ANNOTATION_KEY = "mlserve.io/project-key"  # owner/projects/project
ANNOTATION_NAME = "mlserve.io/name"  # owner/projects/project/N
HTTP_PORT = 8080
INGRESS = "nginx.ingress.kubernetes.io"
PVC_PREFIX = "pvc/"
# Requests are what the scheduler reserves; the spec's limits are the ceiling (a job that idles
# between bursts should not hold two cores of a node).
REQUEST_CPU_MILLI = 100
REQUEST_MEMORY = 256 << 20
SOCKET_VOLUME_BYTES = 1 << 20
PRE_STOP_S = 3
CONFIG_DIR = f"{INSTANCE_RUN_DIR}/config"  # the job's ConfigMap: uwsgi.ini and manifest.json
_SLUG_BAD = re.compile(r"[^a-z0-9-]")


@dataclass(frozen=True)
class ProjectRef:
    owner: str
    project: str

    @property
    def key(self) -> str:
        return f"{self.owner}/projects/{self.project}"

    @property
    def slug(self) -> str:
        """The project's part of object names and its label value: the names, made a DNS label, and
        always a hash of owner/project at the end, so two projects never share a slug (a-b/c and
        a/b-c, a_b and a-b) and no project's slug is another's with a suffix (hello and hello-1)."""
        cleaned = _SLUG_BAD.sub("-", f"{self.owner}-{self.project}")[:30].strip("-")
        return f"{cleaned}-{hashlib.sha256(self.key.encode()).hexdigest()[:6]}"

    def name(self, suffix: str = "") -> str:
        """An object's name: ``mls-<slug>`` and a suffix (a Service's name must start with a letter)."""
        return f"mls-{self.slug}" + (f"-{suffix}" if suffix else "")

    def labels(self) -> dict[str, str]:
        return {**MANAGED, LABEL_PROJECT: self.slug}

    def selector(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.labels().items())


@dataclass(frozen=True)
class ClusterJob:
    id: str  # the endpoint id, as on one machine
    number: int
    version: int
    fallback: bool = False

    def name(self, ref: ProjectRef) -> str:
        return ref.name(str(self.number))

    def labels(self, ref: ProjectRef) -> dict[str, str]:
        return {**ref.labels(), LABEL_JOB: self.id, LABEL_VERSION: str(self.version), LABEL_NUMBER: str(self.number),
                LABEL_ROLE: "fallback" if self.fallback else "primary"}


def _meta(name: str, labels: Mapping[str, str], ref: ProjectRef, **annotations: str) -> dict[str, Any]:
    return {"name": name, "labels": dict(labels), "annotations": {ANNOTATION_KEY: ref.key, **annotations}}


def prefixes(ref: ProjectRef, job: ClusterJob) -> list[str]:
    """The paths a job is reached under, most specific first: its own, its version's, its project's."""
    return [f"/serve/{job.id}", f"/serve/{ref.key}/v/{job.version}", f"/serve/{ref.key}"]


def job_config(ref: ProjectRef, job: ClusterJob, spec: JobSpec, urls: Mapping[str, str]) -> dict[str, Any]:
    """The job's run folder as a ConfigMap: uwsgi.ini (also answering HTTP on HTTP_PORT) and the manifest.
    ``urls``: endpoint, project_endpoint, version_endpoint."""
    ini = uwsgi_ini(UwsgiSettings(spec.workers, spec.timeout_s, spec.body_limit_mb << 20, spec.preload),
                    socket=f"{INSTANCE_RUN_DIR}/{SOCKET_NAME}", app_dir=INSTANCE_APP_DIR, venv=INSTANCE_VENV,
                    http_socket=f":{HTTP_PORT}")
    manifest = {"job": f"{ref.key}/{job.number}", "id": job.id, "project": ref.key, **urls, "version": job.version,
                "data": [{"source": m.source, "mount": m.mount} for m in spec.mounts], "options": dict(spec.options),
                "workers": spec.workers}
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(job.name(ref), job.labels(ref), ref),
            "data": {UWSGI_INI_NAME: ini, MANIFEST_NAME: json.dumps(manifest, indent=2)}}


def _probe(command: list[str], period_s: float, timeout_s: float, failures: int) -> dict[str, Any]:
    return {"exec": {"command": command}, "periodSeconds": max(1, math.ceil(period_s)),
            "timeoutSeconds": max(1, math.ceil(timeout_s)), "failureThreshold": failures}


def probes(spec: JobSpec) -> dict[str, dict[str, Any]]:
    """Readiness (take traffic?) is the health request over the uwsgi socket, as the local supervisor
    sends it; liveness (restart?) is the master's stats: busy workers inside the timeout are alive.
    Both are exec probes: the health var cannot come in over HTTP, so no client can fake a verdict.
    The startup probe holds liveness off until the master answers its stats (workers still loading
    count as busy there, up to LOAD_GRACE_S, as on one machine)."""
    python = f"{INSTANCE_VENV}/bin/python"
    health = spec.health
    ready = [python, "-m", "mlserve_runtime.health", "ready", "--socket", f"{INSTANCE_RUN_DIR}/{SOCKET_NAME}",
             "--timeout", f"{health.timeout_s:g}"]
    live = [python, "-m", "mlserve_runtime.health", "live", "--stats", f"{INSTANCE_RUN_DIR}/{STATS_SOCKET_NAME}",
            "--timeout-s", str(spec.timeout_s), "--probe-timeout", f"{health.timeout_s:g}"]
    startup_period = 2
    return {
        "readinessProbe": _probe(ready, health.interval_s, health.timeout_s + 1, health.failures),
        "livenessProbe": _probe(live, health.interval_s, 5, RESTART_AFTER_FAILURES),
        "startupProbe": _probe(live, startup_period, 5, math.ceil(LOAD_GRACE_S / startup_period)),
    }


def _quantity_cpu(cpus: float) -> str:
    return f"{round(cpus * 1000)}m"


def environment(ref: ProjectRef, job: ClusterJob, spec: JobSpec) -> list[dict[str, str]]:
    """What a local instance's environment has, with paths as the pod has them, and its prefixes."""
    env = instance_environment(spec, name=f"{ref.key}/{job.number}", job_id=job.id, version=job.version,
                               app_dir=INSTANCE_APP_DIR, output_dir=INSTANCE_OUTPUT_DIR,
                               manifest_file=f"{CONFIG_DIR}/{MANIFEST_NAME}")
    env["MLSERVE_PREFIXES"] = ",".join(prefixes(ref, job))
    return [{"name": name, "value": value} for name, value in env.items()]


def job_deployment(ref: ProjectRef, job: ClusterJob, spec: JobSpec, image: str) -> dict[str, Any]:
    """One replica of the image's own command, as locked down as a local container: not root, a
    read-only root filesystem, no capabilities, no privilege escalation, the runtime's seccomp profile,
    no service account token; /tmp and /output are emptyDirs of the spec's sizes."""
    limits = spec.limits
    mounts = [{"name": "run", "mountPath": CONFIG_DIR, "readOnly": True},
              {"name": "sockets", "mountPath": f"{INSTANCE_RUN_DIR}/{SOCKET_DIR}"},
              {"name": "tmp", "mountPath": "/tmp"},
              {"name": "output", "mountPath": INSTANCE_OUTPUT_DIR}]
    volumes: list[dict[str, Any]] = [
        {"name": "run", "configMap": {"name": job.name(ref)}},
        {"name": "sockets", "emptyDir": {"medium": "Memory", "sizeLimit": str(SOCKET_VOLUME_BYTES)}},
        {"name": "tmp", "emptyDir": {"sizeLimit": str(limits.tmp_bytes)}},
        {"name": "output", "emptyDir": {"sizeLimit": str(limits.output_bytes)}},
    ]
    for index, mount in enumerate(spec.mounts):
        volumes.append({"name": f"data-{index}", "persistentVolumeClaim": {
            "claimName": mount.source.removeprefix(PVC_PREFIX), "readOnly": True}})
        mounts.append({"name": f"data-{index}", "mountPath": mount.mount, "readOnly": True})
    container = {
        "name": "app",
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        # The image's own command, with the ini where the ConfigMap is (a folder of its own: subPath
        # mounts are refused by some kubelets and never see updates).
        "command": [f"{INSTANCE_VENV}/bin/uwsgi"],
        "args": ["--ini", f"{CONFIG_DIR}/{UWSGI_INI_NAME}"],
        "env": environment(ref, job, spec),
        "envFrom": [{"secretRef": {"name": ref.name("secrets"), "optional": True}}],
        "ports": [{"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"}],
        "resources": {
            "requests": {"cpu": _quantity_cpu(min(limits.cpus, REQUEST_CPU_MILLI / 1000)),
                         "memory": str(min(limits.memory_bytes, REQUEST_MEMORY))},
            "limits": {"cpu": _quantity_cpu(limits.cpus), "memory": str(limits.memory_bytes)},
        },
        "securityContext": {"runAsNonRoot": True, "runAsUser": CONTAINER_UID, "runAsGroup": CONTAINER_UID,
                            "readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False,
                            "capabilities": {"drop": ["ALL"]}},
        **probes(spec),
        # Endpoints leave ingress-nginx's upstreams a moment after the pod is told to stop: the pod
        # keeps serving that long (uWSGI then stops gracefully, in-flight requests finish).
        "lifecycle": {"preStop": {"exec": {"command": [f"{INSTANCE_VENV}/bin/python", "-c",
                                                      f"import time; time.sleep({PRE_STOP_S})"]}}},
        "volumeMounts": mounts,
    }
    labels = job.labels(ref)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(job.name(ref), labels, ref, **{ANNOTATION_NAME: f"{ref.key}/{job.number}"}),
        "spec": {
            "replicas": 1,
            "revisionHistoryLimit": 1,
            "strategy": {"type": "Recreate"},  # a job is one instance; a new version is a new job
            "selector": {"matchLabels": {LABEL_JOB: job.id}},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "automountServiceAccountToken": False,
                    "enableServiceLinks": False,
                    # uWSGI's graceful stop lets in-flight requests finish within the timeout.
                    "terminationGracePeriodSeconds": PRE_STOP_S + spec.timeout_s + 5,
                    "securityContext": {"runAsNonRoot": True, "runAsUser": CONTAINER_UID,
                                        "runAsGroup": CONTAINER_UID, "fsGroup": CONTAINER_UID,
                                        "seccompProfile": {"type": "RuntimeDefault"}},
                    "containers": [container],
                    "volumes": volumes,
                },
            },
        },
    }


def service(ref: ProjectRef, name: str, selector: Mapping[str, str], labels: Mapping[str, str]) -> dict[str, Any]:
    """A Service on port 80 to the pods' HTTP port, for the pods ``selector`` picks (within the project)."""
    return {"apiVersion": "v1", "kind": "Service", "metadata": _meta(name, labels, ref),
            "spec": {"selector": {**ref.labels(), **selector},
                     "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]}}


def job_service(ref: ProjectRef, job: ClusterJob) -> dict[str, Any]:
    return service(ref, job.name(ref), {LABEL_JOB: job.id}, job.labels(ref))


def version_service(ref: ProjectRef, version: int) -> dict[str, Any]:
    return service(ref, ref.name(f"v{version}"), {LABEL_VERSION: str(version)},
                   {**ref.labels(), LABEL_VERSION: str(version)})


def role_service(ref: ProjectRef, role: str) -> dict[str, Any]:
    """Every job of the project's primary versions (equal turns per job), or of its fallbacks."""
    return service(ref, ref.name(role), {LABEL_ROLE: role}, ref.labels())


def network_policy(ref: ProjectRef, version: int, network: str) -> dict[str, Any] | None:
    """The egress rule of config.NETWORKS for a version's pods (each version keeps the one it was run
    with): isolated reaches the internet and DNS, not private or special ranges (the cluster's own pods
    and nodes among them); none reaches nothing; open needs no policy."""
    if network == "open":
        return None
    egress: list[dict[str, Any]] = []
    if network == "isolated":
        egress = [{"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": list(BLOCKED)}}]},
                  {"ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]}]
    labels = {**ref.labels(), LABEL_VERSION: str(version)}
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": _meta(ref.name(f"v{version}"), labels, ref),
            "spec": {"podSelector": {"matchLabels": labels}, "policyTypes": ["Egress"], "egress": egress}}


def secret(ref: ProjectRef, values: Mapping[str, str]) -> dict[str, Any]:
    """The project's secrets, as the pods' environment (never in the image or the job spec)."""
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque", "metadata": _meta(ref.name("secrets"), ref.labels(), ref),
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in sorted(values.items())}}


def project_record(ref: ProjectRef, record: Mapping[str, Any]) -> dict[str, Any]:
    """The project's record on the cluster (versions, their specs, the split, the last job number):
    a ConfigMap, changed only with its resourceVersion, so two commands never both take a number."""
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(ref.name(), ref.labels(), ref),
            "data": {"record": json.dumps(record, sort_keys=True)}}


# -- routes -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Routes:
    """Where the project endpoint goes: ``main`` Service, and ``canary`` with ``weight`` percent."""

    main: str
    canary: str | None = None
    weight: int = 0
    fallback: str | None = None
    versions: tuple[int, ...] = ()  # version endpoints
    jobs: tuple[ClusterJob, ...] = ()  # job endpoints


def _path(path: str, backend: str) -> dict[str, Any]:
    return {"path": path, "pathType": "Prefix", "backend": {"service": {"name": backend, "port": {"name": "http"}}}}


def _ingress(ref: ProjectRef, name: str, host: str | None, paths: list[dict[str, Any]], ingress_class: str,
             annotations: Mapping[str, str]) -> dict[str, Any]:
    rule: dict[str, Any] = {"http": {"paths": paths}}
    if host:
        rule = {"host": host, **rule}
    return {"apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
            "metadata": _meta(name, ref.labels(), ref, **annotations),
            "spec": {"ingressClassName": ingress_class, "rules": [rule]}}


def ingresses(ref: ProjectRef, routes: Routes, host: str | None, ingress_class: str, body_limit_mb: int,
              timeout_s: int) -> list[dict[str, Any]]:
    """The project's Ingress objects: the project route (with the fallback as its default backend), the
    canary beside it when two versions share, and the direct routes (versions, jobs) that never fall back."""
    # As the local gateway: one body limit and timeout, and a request that timed out is not sent again
    # to another pod (ingress-nginx would, up to 3 times: 3 workers busy with one slow request).
    limits = {f"{INGRESS}/proxy-body-size": f"{body_limit_mb}m", f"{INGRESS}/proxy-read-timeout": str(timeout_s),
              f"{INGRESS}/proxy-send-timeout": str(timeout_s), f"{INGRESS}/proxy-next-upstream": "error"}
    project_path = f"/serve/{ref.key}"
    main = {**limits, **({f"{INGRESS}/default-backend": routes.fallback} if routes.fallback else {})}
    objects = [_ingress(ref, ref.name(), host, [_path(project_path, routes.main)], ingress_class, main)]
    if routes.canary:
        canary = {**limits, f"{INGRESS}/canary": "true", f"{INGRESS}/canary-weight": str(routes.weight)}
        objects.append(_ingress(ref, ref.name("canary"), host, [_path(project_path, routes.canary)], ingress_class,
                                canary))
    direct = [_path(f"{project_path}/v/{v}", ref.name(f"v{v}")) for v in routes.versions]
    direct += [_path(f"/serve/{job.id}", job.name(ref)) for job in routes.jobs]
    if direct:
        objects.append(_ingress(ref, ref.name("direct"), host, direct, ingress_class, limits))
    return objects
