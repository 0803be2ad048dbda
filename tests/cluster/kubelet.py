"""A real node for the test control plane: Kubernetes 1.20's kubelet (built by ``build-kubernetes`` from the same
Debian source as the control plane) over Debian's containerd, runc and containernetworking-plugins, where pods
really run: their exec probes run in the container, their IP answers from this machine, their log comes through
the API server, their securityContext is enforced by runc.

``RealNode().start(control_plane)`` (or ``with RealNode() as node: node.start(plane)``) runs, in a fresh temporary
folder, without touching this machine's Docker, its containerd or its settings:

- a bridge of its own (``mlsk`` + 8 hex digits) holding the first address of a free 10.250.N.0/24: the node's
  InternalIP (a kubelet refuses a loopback node IP), and its name, for a reason below; pods get the other
  addresses of that /24 from the CNI plugins bridge + host-local (+ portmap), which makes pod IPs reachable from
  this machine. No masquerading, no iptables rule: pods reach nothing but this machine;
- a mount namespace of its own (``unshare --mount``) that containerd and the kubelet share, where folders the
  kubelet and containerd hard-code are bind mounts of the temporary folder's: /var/lib (/var/lib/kubelet with its
  device-plugin and pod-resources sockets, /var/lib/cni), /var/log (/var/log/pods, /var/log/containers),
  /run/containerd (runc's state, the shims' sockets); and the six kernel settings a 1.20 kubelet sets at start
  (vm.overcommit_memory=1, kernel.panic=10, kernel.panic_on_oops=1, ...) are files there, so the machine's own
  stay as they are. Every mount (containers' root filesystems, their volumes, the pods' network namespaces)
  disappears with the namespace's last process;
- cgroups of its own, ``/mlserve-kubelet-<hex>`` in every hierarchy (cgroupfs driver): the kubelet's
  ``--cgroup-root`` for its pods, and ``system/`` for containerd, the kubelet and the shims, so that ``stop()``
  finds (and kills) every process this node made, containers included, by cgroup;
- containerd (``/usr/bin/containerd``, its own config, root, state and socket) whose CRI plugin uses the bridge
  above, pulls from the control plane's registry over plain HTTP, and starts pods with a sandbox ("pause") image
  built here (a static Go program that waits for SIGTERM) and imported with ``ctr``: nothing can be pulled from
  the internet;
- the kubelet, as the control plane's admin, registering the node with label ``mlserve.test/real-node=true`` and
  taint ``mlserve.test/real-node=true:NoSchedule``: only pods with ``node.pod_spec_patch()`` (a nodeSelector and a
  toleration) go there, so hollow nodes keep the other tests' pods.

``start()`` returns once the node is Ready (~4s). ``stop()`` ends every process (SIGTERM to the kubelet, then
SIGKILL to everything in the node's cgroups), removes the cgroups, the Node object, the bridge and the folder.

How the API server reaches this kubelet, with the control plane's flags unchanged: it connects to the node's
preferred address, Hostname first by default (``--kubelet-preferred-address-types``), which is the node's name;
so the node is named after its IP (a valid node name), which needs no DNS. It does not check the kubelet's
serving certificate (no ``--kubelet-certificate-authority``) and presents no client certificate, so the kubelet
serves anonymous requests (``--anonymous-auth=true --authorization-mode=AlwaysAllow``, the 1.20 defaults, spelt
out), on the node's IP and a free port (``--port``, published in the node's status) rather than 10250.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import io
import ipaddress
import json
import os
import platform
import random
import secrets
import shutil
import signal
import socket
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

from kubernetes import client as k8s

from tests.cluster.controlplane import ControlPlane, kube_bin_dir

LABEL = "mlserve.test/real-node"  # the node's label and taint key, value "true"
CONTAINERD = Path("/usr/bin/containerd")
CTR = Path("/usr/bin/ctr")
SHIM = Path("/usr/bin/containerd-shim-runc-v2")
RUNC = Path("/usr/sbin/runc")
CNI_BIN = Path("/usr/lib/cni")  # containernetworking-plugins
CNI_PLUGINS = ("bridge", "host-local", "loopback", "portmap")
GO = Path("/usr/lib/go-1.19/bin/go")  # installed by build-kubernetes; builds the pause program
TOOLS = ("unshare", "nsenter", "mount", "ip")
PAUSE_IMAGE = "mlserve.test/pause:1"
SUBNETS = "10.250.{}.0/24"
START_TIMEOUT = 90.0
# What a 1.20 kubelet sets at start (pkg/kubelet/cm/container_manager_linux.go, setupKernelTunables): files of
# ours in the node's mount namespace, so that it changes nothing on this machine.
KERNEL_TUNABLES = {"vm/overcommit_memory": "1", "vm/panic_on_oom": "0", "kernel/panic": "10",
                   "kernel/panic_on_oops": "1", "kernel/keys/root_maxkeys": "1000000",
                   "kernel/keys/root_maxbytes": "25000000"}
# Folders containerd and the kubelet use whatever their flags say: bind mounts of ours in the node's namespace.
PRIVATE_DIRS = {"/var/lib": "var-lib", "/var/log": "var-log", "/run/containerd": "run-containerd"}

PAUSE_GO = """package main

import (
\t"os"
\t"os/signal"
\t"syscall"
)

// The pod sandbox's process: holds the pod's namespaces until the runtime stops it.
func main() {
\tstop := make(chan os.Signal, 1)
\tsignal.Notify(stop, syscall.SIGINT, syscall.SIGTERM)
\t<-stop
}
"""


class RealNodeError(RuntimeError):
    """The real node cannot start, or did not become Ready."""


class RealNode:
    """A kubelet over containerd in namespaces of its own; see the module's docstring."""

    def __init__(self, bin_dir: Path | str | None = None) -> None:
        self.bin_dir = Path(bin_dir) if bin_dir is not None else None
        self.id = secrets.token_hex(4)
        self.dir = Path(tempfile.mkdtemp(prefix="mlskubelet-"))
        self.bridge = f"mlsk{self.id}"
        self.cgroup = f"mlserve-kubelet-{self.id}"
        self.subnet: ipaddress.IPv4Network | None = None
        self.port = 0  # the kubelet's HTTPS port
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.timings: dict[str, float] = {}  # step -> seconds into start()
        self.started_in: float | None = None
        self._cgroup_dirs: list[Path] = []
        self._bridge_made = False
        self._plane: ControlPlane | None = None
        self._start_time = time.monotonic()
        self._stopped = False

    # What tests use.

    @property
    def ip(self) -> str:
        """The node's InternalIP, the bridge's address: pods' IPs are in the same /24."""
        assert self.subnet is not None, "not started"
        return str(self.subnet.network_address + 1)

    @property
    def name(self) -> str:
        """The node's name: its IP (see the module's docstring)."""
        return self.ip

    @property
    def socket(self) -> Path:
        """containerd's socket (for ``ctr -a``)."""
        return self.dir / "containerd.sock"

    def pod_spec_patch(self) -> dict[str, Any]:
        """What a pod spec needs to run on this node (and on no other): a strategic merge patch of its spec."""
        return {"nodeSelector": {LABEL: "true", "kubernetes.io/hostname": self.name},
                "tolerations": [{"key": LABEL, "operator": "Equal", "value": "true", "effect": "NoSchedule"}]}

    def log_path(self, name: str) -> Path:
        """The log of ``containerd`` or ``kubelet``."""
        return self.dir / "logs" / f"{name}.log"

    def log_tail(self, name: str, lines: int = 40) -> str:
        try:
            text = self.log_path(name).read_text(errors="replace")
        except OSError as exc:
            return f"(no log for {name}: {exc})"
        return "\n".join(text.splitlines()[-lines:])

    # Start and stop.

    def start(self, plane: ControlPlane) -> Self:
        """Starts containerd and the kubelet for ``plane``; returns once the node is Ready. Raises RealNodeError
        (after cleaning up) if it cannot."""
        self._start_time = time.monotonic()
        self._plane = plane
        atexit.register(self.stop)
        try:
            bin_dir = self.bin_dir or kube_bin_dir()
            self._check(bin_dir)
            self._make_cgroups()
            self._make_bridge()
            self._write_files(plane)
            self._build_pause_image()
            self._step("files")
            self._start_namespace()
            self._start_containerd()
            self._import_pause_image()
            self._start_kubelet(bin_dir, plane)
            with plane.api_client() as api:
                self._wait("the node to be Ready", lambda: self._ready(k8s.CoreV1Api(api)), "kubelet")
        except BaseException as exc:
            self._fail_start(exc)
            raise
        self.started_in = time.monotonic() - self._start_time
        return self

    def stop(self) -> None:
        """Ends every process of the node (the kubelet gently first, then everything in its cgroups, containers
        included), then removes its cgroups, its Node, its bridge and its folder."""
        if self._stopped:
            return
        self._stopped = True
        atexit.unregister(self.stop)
        with contextlib.suppress(KeyError):
            _terminate(self.processes["kubelet"], 10)
        self._kill_cgroup_processes()
        for process in self.processes.values():
            _terminate(process, 5)
        self._remove_cgroups()
        if self._plane is not None and self.subnet is not None:
            self._forget_node(self._plane)
        if self._bridge_made:
            subprocess.run(["ip", "link", "delete", self.bridge], capture_output=True, check=False)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _forget_node(self, plane: ControlPlane) -> None:
        """Deletes the Node, so that a control plane that goes on serving other tests has its hollow nodes only
        (the pod garbage collector then deletes pods left bound to it)."""
        with contextlib.suppress(Exception), plane.api_client() as api:
            k8s.CoreV1Api(api).delete_node(self.name)

    # Steps.

    def _check(self, bin_dir: Path) -> None:
        missing = [str(p) for p in (bin_dir / "kubelet", CONTAINERD, CTR, SHIM, RUNC, GO) if not os.access(p, os.X_OK)]
        missing += [str(CNI_BIN / p) for p in CNI_PLUGINS if not os.access(CNI_BIN / p, os.X_OK)]
        missing += [tool for tool in TOOLS if shutil.which(tool) is None]
        if missing:
            raise RealNodeError(f"missing for the real node: {', '.join(missing)} (tests/cluster/build-kubernetes "
                                "builds the kubelet and installs containernetworking-plugins; containerd and runc "
                                "come with docker.io)")
        if os.geteuid() != 0:
            raise RealNodeError("the real node needs root: namespaces, cgroups, a bridge")

    def _make_cgroups(self) -> None:
        """``/mlserve-kubelet-<id>/system`` in every cgroup hierarchy (the one, with cgroup v2)."""
        root = Path("/sys/fs/cgroup")
        if (root / "cgroup.controllers").exists():
            hierarchies = [root]
        else:
            hierarchies = []
            for line in Path("/proc/self/mountinfo").read_text().splitlines():
                fields = line.split()
                if fields[fields.index("-") + 1] in ("cgroup", "cgroup2"):  # v1, and v2 beside it ("hybrid")
                    hierarchies.append(Path(fields[4]))
        if not hierarchies:
            raise RealNodeError("no cgroup hierarchy is mounted")
        for hierarchy in hierarchies:
            top = hierarchy / self.cgroup
            self._cgroup_dirs.append(top)
            for folder in (top, top / "system"):
                folder.mkdir()
                # cgroup v1's cpuset: a new cgroup has no CPU and no memory node until given its parent's.
                for name in ("cpuset.cpus", "cpuset.mems"):
                    if hierarchy != root and (folder / name).exists() and not (folder / name).read_text().strip():
                        (folder / name).write_text((folder.parent / name).read_text())
            if hierarchy == root:  # cgroup v2: the controllers the kubelet needs, for its pods' cgroups
                wanted = set((root / "cgroup.subtree_control").read_text().split())
                (top / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in sorted(wanted)))

    def _make_bridge(self) -> None:
        """The bridge, with the first address of a /24 that no interface or route of this machine overlaps."""
        used: list[ipaddress.IPv4Network] = []
        for command in (["ip", "-4", "-o", "addr", "show"], ["ip", "-4", "route", "show", "table", "all"]):
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            for word in out.split():
                with contextlib.suppress(ValueError):
                    if "/" in word or word[:1].isdigit():
                        used.append(ipaddress.ip_network(word, strict=False))
        candidates = [ipaddress.ip_network(SUBNETS.format(n)) for n in range(256)]
        free = [net for net in candidates if not any(net.overlaps(u) for u in used if u.prefixlen > 0)]
        if not free:
            raise RealNodeError(f"no free subnet {SUBNETS.format('N')}")
        self.subnet = random.choice(free)
        gateway = f"{self.ip}/{self.subnet.prefixlen}"
        for command in (["ip", "link", "add", self.bridge, "type", "bridge"],
                        ["ip", "addr", "add", gateway, "dev", self.bridge],
                        ["ip", "link", "set", self.bridge, "up"]):
            result = subprocess.run(command, capture_output=True, text=True, check=False)
            if result.returncode != 0:
                raise RealNodeError(f"{' '.join(command)} failed: {result.stderr.strip()}")
            self._bridge_made = True

    def _write_files(self, plane: ControlPlane) -> None:
        d = self.dir
        for folder in ("logs", "var-lib/kubelet", "var-lib/cni", "var-log/pods", "var-log/containers",
                       "run-containerd", "containerd/root", "containerd/state", "cni", "sysctl"):
            (d / folder).mkdir(parents=True)
        for key, value in KERNEL_TUNABLES.items():
            (d / "sysctl" / key.replace("/", ".")).write_text(value + "\n")
        assert self.subnet is not None
        conflist = {
            "cniVersion": "0.4.0",
            "name": "mlserve-real-node",
            "plugins": [
                {"type": "bridge", "bridge": self.bridge, "isGateway": True, "ipMasq": False, "hairpinMode": True,
                 "ipam": {"type": "host-local", "ranges": [[{"subnet": str(self.subnet), "gateway": self.ip}]]}},
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ],
        }
        (d / "cni" / "10-mlserve.conflist").write_text(json.dumps(conflist, indent=2))
        cri = '[plugins."io.containerd.grpc.v1.cri"'
        registry = plane.registry
        (d / "containerd.toml").write_text(f"""version = 2
root = "{d}/containerd/root"
state = "{d}/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
                    "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]

[grpc]
  address = "{self.socket}"

[ttrpc]
  address = "{self.socket}.ttrpc"

[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/containerd/opt"

{cri}]
  sandbox_image = "{PAUSE_IMAGE}"
  netns_mounts_under_state_dir = true
  # Not below containerd's own (0): the kubelet asks -998 for sandboxes, which needs CAP_SYS_RESOURCE, and
  # a machine (or a container) may lack it.
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"

{cri}.cni]
  bin_dir = "{CNI_BIN}"
  conf_dir = "{d}/cni"

{cri}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"

{cri}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

{cri}.containerd.runtimes.runc.options]
  BinaryName = "{RUNC}"
  SystemdCgroup = false

{cri}.registry.mirrors."{registry}"]
  endpoint = ["http://{registry}"]
""")

    def _build_pause_image(self) -> None:
        """A one-layer image (Docker's archive format, as ``ctr images import`` reads it) of a static program."""
        build = self.dir / "pause"
        build.mkdir()
        (build / "pause.go").write_text(PAUSE_GO)
        env = {**os.environ, "CGO_ENABLED": "0", "GO111MODULE": "off", "GOFLAGS": ""}
        env.setdefault("GOCACHE", str(Path(env.get("HOME") or "/root") / ".cache" / "go-build"))
        result = subprocess.run([str(GO), "build", "-trimpath", "-ldflags=-s", "-o", "pause", "pause.go"],
                                cwd=build, env=env, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RealNodeError(f"building the pause program failed:\n{result.stderr}")
        layer = io.BytesIO()
        with tarfile.open(fileobj=layer, mode="w") as tar:
            info = tar.gettarinfo(str(build / "pause"), arcname="pause")
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mode = 0o755
            with (build / "pause").open("rb") as binary:
                tar.addfile(info, binary)
        layer_bytes = layer.getvalue()
        diff_id = "sha256:" + hashlib.sha256(layer_bytes).hexdigest()
        arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
        config = json.dumps({"architecture": arch, "os": "linux",
                             "config": {"Entrypoint": ["/pause"], "User": "65535:65535"},
                             "rootfs": {"type": "layers", "diff_ids": [diff_id]}}).encode()
        config_name = hashlib.sha256(config).hexdigest() + ".json"
        manifest = json.dumps([{"Config": config_name, "RepoTags": [PAUSE_IMAGE],
                                "Layers": ["layer/layer.tar"]}]).encode()
        with tarfile.open(self.dir / "pause.tar", mode="w") as tar:
            for name, data in ((config_name, config), ("layer/layer.tar", layer_bytes), ("manifest.json", manifest)):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))

    def _start_namespace(self) -> None:
        """A process holding the node's mount namespace, where containerd and the kubelet then enter."""
        mounts = [f'mount --bind "{self.dir / source}" "{target}"' for target, source in PRIVATE_DIRS.items()]
        mounts += [f'mount --bind "{self.dir / "sysctl" / key.replace("/", ".")}" "/proc/sys/{key}"'
                   for key in KERNEL_TUNABLES]
        Path("/run/containerd").mkdir(exist_ok=True)  # the mount point (Docker's containerd makes it too)
        ready = self.dir / "namespace-ready"
        script = " && ".join([*mounts, f'touch "{ready}"', "exec sleep infinity"])
        self._run("namespace", ["unshare", "--mount", "--propagation=private", "--", "/bin/sh", "-c", script])
        self._wait("the mount namespace", ready.exists, "namespace")

    def _enter(self, argv: list[str]) -> list[str]:
        return ["nsenter", f"--target={self.processes['namespace'].pid}", "--mount", "--", *argv]

    def _start_containerd(self) -> None:
        self._run("containerd", self._enter([str(CONTAINERD), "--config", str(self.dir / "containerd.toml")]))
        self._wait("containerd to answer", lambda: self.ctr("version").returncode == 0, "containerd")

    def ctr(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``ctr`` against the node's containerd, in the CRI's namespace k8s.io (not for ``run``: the fifos it
        makes would be outside the node's mount namespace)."""
        return subprocess.run([str(CTR), "--address", str(self.socket), "--namespace", "k8s.io", *args],
                              capture_output=True, text=True, check=False, timeout=60)

    def _import_pause_image(self) -> None:
        result = self.ctr("images", "import", str(self.dir / "pause.tar"))
        if result.returncode != 0:
            raise RealNodeError(f"ctr images import failed: {result.stderr.strip()}")
        self._step("the pause image imported")

    def _start_kubelet(self, bin_dir: Path, plane: ControlPlane) -> None:
        self.port = _free_port()
        self._run("kubelet", self._enter([
            str(bin_dir / "kubelet"),
            f"--kubeconfig={plane.admin_kubeconfig}",  # as the admin: the control plane has no token for us
            f"--hostname-override={self.name}", f"--node-ip={self.ip}",
            f"--address={self.ip}", f"--port={self.port}", "--read-only-port=0",
            f"--healthz-port={_free_port()}", "--healthz-bind-address=127.0.0.1",
            "--anonymous-auth=true", "--authorization-mode=AlwaysAllow",  # the API server has no client cert
            "--container-runtime=remote", f"--container-runtime-endpoint=unix://{self.socket}",
            f"--pod-infra-container-image={PAUSE_IMAGE}",  # never garbage-collected
            "--cgroup-driver=cgroupfs", f"--cgroup-root=/{self.cgroup}",
            "--root-dir=/var/lib/kubelet", "--cert-dir=/var/lib/kubelet/pki",  # in the namespace: ours
            "--volume-plugin-dir=/var/lib/kubelet/volume-plugins",
            "--fail-swap-on=false",
            "--node-status-update-frequency=2s",  # Ready 2s after registering, not 10s
            "--make-iptables-util-chains=false",  # no KUBE-* chains in this machine's iptables
            f"--node-labels={LABEL}=true", f"--register-with-taints={LABEL}=true:NoSchedule",
            # A test machine's disk may be fuller than a server's: no eviction, no image garbage collection.
            "--eviction-hard=memory.available<100Mi,nodefs.available<1%,imagefs.available<1%",
            "--image-gc-high-threshold=100", "--image-gc-low-threshold=99",
            "--v=2",
        ]))

    def _ready(self, core: k8s.CoreV1Api) -> bool:
        node = core.read_node(self.name)
        return any(c.type == "Ready" and c.status == "True" for c in node.status.conditions or [])

    # Processes and waiting.

    def _run(self, name: str, argv: list[str]) -> None:
        """Starts ``argv`` in the node's cgroups (a shell joins them, then execs it), in a session of its own."""
        procs = " ".join(str(d / "system" / "cgroup.procs") for d in self._cgroup_dirs)
        script = 'for f in $MLSERVE_CGROUP_PROCS; do echo $$ > "$f"; done; exec "$@"'
        env = {**os.environ, "MLSERVE_CGROUP_PROCS": procs}
        with self.log_path(name).open("ab") as out:
            self.processes[name] = subprocess.Popen(["/bin/sh", "-c", script, "sh", *argv], stdin=subprocess.DEVNULL,
                                                    stdout=out, stderr=subprocess.STDOUT, cwd=self.dir, env=env,
                                                    start_new_session=True)
        self._step(f"{name} started")

    def _step(self, what: str) -> None:
        self.timings[what] = round(time.monotonic() - self._start_time, 2)

    def _wait(self, what: str, ready: Callable[[], object], *suspects: str, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while True:
            for name, process in self.processes.items():
                if process.poll() is not None:
                    raise RealNodeError(f"{name} exited with code {process.returncode} while waiting for {what}; "
                                        f"the end of its log:\n{self.log_tail(name)}")
            try:
                if ready():
                    self._step(what)
                    return
            except Exception as exc:  # noqa: BLE001 - not ready yet; kept for the message
                last_error = exc
            if time.monotonic() > deadline:
                tails = "\n".join(f"--- {s}:\n{self.log_tail(s)}" for s in suspects)
                raise RealNodeError(f"timed out after {timeout:g}s waiting for {what} (last error: {last_error!r})"
                                    f"\n{tails}")
            time.sleep(0.2)

    def _fail_start(self, exc: BaseException) -> None:
        logs = self.dir / "logs"
        if logs.is_dir():
            kept = Path(tempfile.mkdtemp(prefix="mlskubelet-failed-logs-"))
            shutil.copytree(logs, kept, dirs_exist_ok=True)
            exc.add_note(f"the real node's logs: {kept}")
        self.stop()

    def pids(self) -> set[int]:
        """Every process in the node's cgroups: containerd, the kubelet, shims, containers."""
        pids: set[int] = set()
        for top in self._cgroup_dirs:
            for folder, _, _ in os.walk(top):
                with contextlib.suppress(OSError):
                    pids.update(int(p) for p in (Path(folder) / "cgroup.procs").read_text().split())
        return pids

    def _kill_cgroup_processes(self) -> None:
        """SIGKILL to every process in the node's cgroups (containerd, shims, containers, ...) until none is left."""
        deadline = time.monotonic() + 30
        while (pids := self.pids()) and time.monotonic() < deadline:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            for process in self.processes.values():
                with contextlib.suppress(ChildProcessError):
                    process.poll()
            time.sleep(0.1)

    def _remove_cgroups(self) -> None:
        """The node's cgroups, deepest first (the kubelet's pod cgroups below ours included)."""
        for top in self._cgroup_dirs:
            if not top.exists():
                continue
            folders = sorted((Path(f) for f, _, _ in os.walk(top)), key=lambda p: len(p.parts), reverse=True)
            for folder in folders:
                for _ in range(50):  # a cgroup whose last process just died may be busy for a moment
                    try:
                        folder.rmdir()
                        break
                    except FileNotFoundError:
                        break
                    except OSError:
                        time.sleep(0.1)


def _terminate(process: subprocess.Popen[bytes], grace: float) -> None:
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
