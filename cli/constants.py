"""Names and defaults shared by the host side; label keys live here and nowhere else."""

from __future__ import annotations

# Defined where the probes are (they run inside instances too, without mlserve): one definition.
from mlserve_runtime.health import HEALTH_TIMEOUT_S as HEALTH_TIMEOUT_S  # a check slower than this fails
from mlserve_runtime.health import HEALTH_VAR as HEALTH_VAR  # uwsgi var only the probe sets; nginx never forwards it
from mlserve_runtime.health import LOAD_GRACE_S as LOAD_GRACE_S  # a worker loading the app longer is stuck
from mlserve_runtime.health import STATS_TIMEOUT_S as STATS_TIMEOUT_S  # for the master's stats answer

LABEL_PREFIX = "io.mlserve"
LABEL_HOME = f"{LABEL_PREFIX}.home"  # the MLSERVE_HOME that owns the object
LABEL_JOB = f"{LABEL_PREFIX}.job"  # endpoint id of the serving job
LABEL_NAME = f"{LABEL_PREFIX}.name"  # owner/projects/project/N
LABEL_PROJECT = f"{LABEL_PREFIX}.project"  # owner/projects/project

DEFAULT_WORKERS = 2
DEFAULT_BODY_LIMIT_MB = 100
DEFAULT_TIMEOUT_S = 60
DEFAULT_GATEWAY_PORT = 8000
DEFAULT_GATEWAY_HOST = "127.0.0.1"
GATEWAY_USER = "mlserve-gateway"  # user and group of nginx's workers under root: they reach the sockets (privileges.py)
DEFAULT_LOG_FILE_MAX_BYTES = 1 << 30
KEEP_VERSIONS = 3  # a project's newest versions whose images are kept after their jobs stop (for rollbacks)

# Inside every instance.
CONTAINER_UID = 65534
INSTANCE_RUN_DIR = "/run/mlserve"  # per-job host dir (socket, uwsgi.ini, manifest) is mounted here
INSTANCE_APP_DIR = "/app"
INSTANCE_OUTPUT_DIR = "/output"
INSTANCE_VENV = "/opt/mlserve/venv"
SOCKET_DIR = "sock"  # the one writable part of the run dir inside an instance
SOCKET_NAME = f"{SOCKET_DIR}/uwsgi.sock"
STATS_SOCKET_NAME = f"{SOCKET_DIR}/stats.sock"  # the uWSGI master's stats, next to the uwsgi socket
UWSGI_INI_NAME = "uwsgi.ini"
MANIFEST_NAME = "manifest.json"
INSTANCE_LOG_NAME = "instance.log"  # in the run dir: a local instance's output, a stopped container's last lines

ENDPOINT_ID_LENGTH = 22
DEFAULT_ENV = "default"
ENVIRONMENTS = {"default": "python:3.11-slim", "python-3.11": "python:3.11-slim"}
LOCAL_BASE_IMAGE = "mlserve/base:bookworm"  # built by `mlserve setup` where nothing can be pulled

# Self-healing: the supervisor's defaults (mlserve.yml `health:` overrides them per project).
HEALTH_INTERVAL_S = 2.0  # between checks of one instance
HEALTH_FAILURES = 2  # consecutive failed checks take a job out of the rotation
RESTART_AFTER_FAILURES = 5  # ... and this many restart it
MAX_RESTART_STREAK = 5  # restarts without a healthy spell in between before a job is `failed`
HEALTHY_SPELL_S = 30.0  # healthy this long, and a job's restart streak is forgotten
DEFAULT_MAX_RUNTIME_S = 7 * 24 * 3600
DRAIN_GRACE_S = 0.5  # after leaving the rotation, before SIGTERM: requests on their way still land
