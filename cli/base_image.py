"""A base image for builds: the default environment's image when the engine has or can pull it,
else a Debian made locally with debootstrap and imported into Docker (no registry needed).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from .constants import DEFAULT_ENV, ENVIRONMENTS, LABEL_PREFIX, LOCAL_BASE_IMAGE
from .engine import Engine
from .errors import MlserveError, SetupError
from .programs import SYSTEM_PATH, Report, find_program, tail

PULL_TIMEOUT_S = 20.0
DEBIAN_SUITE = "bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
BASE_PACKAGES = ("python3", "python3-venv", "python3-pip", "ca-certificates")
LABEL_BASE = f"{LABEL_PREFIX}.base"  # on images `mlserve setup` made; value: how
BASE_IMAGE_CHANGES = (
    f"LABEL {LABEL_BASE}=debootstrap-{DEBIAN_SUITE}",
    f"ENV PATH={SYSTEM_PATH}",
    "ENV LANG=C.UTF-8",
    'CMD ["python3"]',
)


def ensure_base_image(report: Report, engine: Engine, tag: str = LOCAL_BASE_IMAGE) -> str:
    """Make sure builds have a base: the default environment's image, else the local ``tag``.

    Tries a pull of the default image (bounded by PULL_TIMEOUT_S), then builds ``tag`` with
    debootstrap. Returns the image builds will start from. Raises SetupError, or
    EngineUnavailableError when the engine stops answering.
    """
    default = ENVIRONMENTS[DEFAULT_ENV]
    if engine.image_exists(default):
        report(f"Base image {default} ... ok")
        return default
    if engine.image_exists(tag):
        report(f"Base image {tag} ... ok ({default} is not on this engine)")
        return tag
    if pull(engine, default, report):
        return default
    if os.geteuid() != 0:
        raise SetupError(
            f"neither {default} nor the local base {tag} is on the engine, and {default} cannot be pulled",
            "Run `mlserve setup` as root to build the local base with debootstrap.",
        )
    build_local_base(engine, tag, report)
    return tag


def pull(engine: Engine, ref: str, report: Report, timeout: float = PULL_TIMEOUT_S) -> bool:
    """Try to pull ``ref`` for at most ``timeout`` seconds; False (with the reason reported) if not."""
    report(f"Pulling {ref} ...")
    outcome: list[BaseException | None] = []

    def attempt() -> None:
        try:
            engine.pull(ref)
            outcome.append(None)
        except Exception as exc:  # noqa: BLE001 - any failure means "build locally"
            outcome.append(exc)

    # A thread, because an unreachable registry can hang the pull; a daemon, so it cannot hold us.
    worker = threading.Thread(target=attempt, name=f"pull {ref}", daemon=True)
    worker.start()
    worker.join(timeout)
    if not outcome:
        report(f"  no answer within {timeout:.0f}s; building a local base instead")
        return False
    error = outcome[0]
    if error is None:
        report(f"  pulled {ref}")
        return True
    report(f"  cannot pull ({_first_line(_reason(error))}); building a local base instead")
    return False


def build_local_base(engine: Engine, tag: str, report: Report, mirror: str = DEBIAN_MIRROR) -> None:
    """Build Debian ``bookworm`` with python3 and venv by debootstrap and import it as ``tag``.

    Needs root, debootstrap and the Debian mirror (about 45 s and 300 MB). Raises SetupError.
    """
    debootstrap = find_program("debootstrap")
    if debootstrap is None:
        raise SetupError("debootstrap is not installed", "Run `mlserve setup` as root, or `apt-get install -y debootstrap`.")
    report(f"Building the local base image {tag}: Debian {DEBIAN_SUITE} by debootstrap (about a minute) ...")
    started = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="mlserve-base-", dir="/var/tmp"))
    root.chmod(0o755)  # it becomes the image's /, which the unprivileged user must traverse
    try:
        command = [debootstrap, "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", DEBIAN_SUITE, str(root), mirror]
        result = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise SetupError(
                f"debootstrap failed (exit {result.returncode})",
                tail(result.stdout + result.stderr) + f"\nCheck that {mirror} is reachable, then run `mlserve setup` again.",
            )
        _trim(root)
        report(f"  debootstrap done in {time.monotonic() - started:.0f}s; importing into Docker ...")
        import_tree(engine, root, tag)
    finally:
        _remove_tree(root, report)
    report(f"Built {tag} in {time.monotonic() - started:.0f}s")


def import_tree(engine: Engine, root: Path, tag: str) -> None:
    """``tar -C root -c . | docker import - tag`` through the engine (the docker CLI may be absent).

    Raises SetupError when tar fails or no image comes of it, EngineUnavailableError or MlserveError
    when the engine refuses the import.
    """
    with tempfile.TemporaryFile() as err:  # a file, not a pipe: tar's warnings must not block it
        tar = subprocess.Popen(["tar", "--numeric-owner", "-C", str(root), "-c", "."], stdout=subprocess.PIPE, stderr=err)
        out = tar.stdout
        assert out is not None

        def chunks() -> Iterator[bytes]:
            while block := out.read(1 << 20):
                yield block

        try:
            answer = engine.import_image(chunks(), tag, BASE_IMAGE_CHANGES)
        finally:
            out.close()  # if the engine gave up, tar stops on a broken pipe
            code = tar.wait()
        if code != 0:
            err.seek(0)
            raise SetupError(f"tar of {root} failed (exit {code})", tail(err.read().decode(errors="replace")))
    if not engine.image_exists(tag):
        raise SetupError(f"the engine did not create {tag}", tail(answer))


def _trim(root: Path) -> None:
    """Drop apt's downloaded packages and lists, as Debian's own images do."""
    for folder in (root / "var/cache/apt/archives", root / "var/lib/apt/lists"):
        for path in folder.glob("*"):
            if path.is_file() and path.name != "lock":
                path.unlink()


def _remove_tree(root: Path, report: Report) -> None:
    """Delete the debootstrap tree, never crossing into something still mounted inside it."""
    def mounted() -> list[str]:
        return [m for m in _mount_points() if m == str(root) or m.startswith(f"{root}/")]

    for point in sorted(mounted(), reverse=True):  # a failed debootstrap can leave proc, sys, dev
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)
    if mounted():
        report(f"Warning: left {root} in place; something is still mounted inside it")
        return
    shutil.rmtree(root, ignore_errors=True)


def _mount_points() -> list[str]:
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return []
    # The file escapes spaces and the like as octal (\040).
    return [line.split()[1].encode().decode("unicode_escape") for line in lines if len(line.split()) > 1]


def _reason(error: BaseException) -> str:
    """Why a pull failed in the engine's own words (the registry's answer), not the wrapper's."""
    cause = error.__cause__ if isinstance(error, MlserveError) and error.__cause__ is not None else error
    return str(getattr(cause, "explanation", None) or cause)


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else "no reason given"
