"""bench/RESULTS.md: the tables of a run, under the machine it ran on. A section this run did not measure
is carried over from the previous file, marked so; notes written by hand below NOTES_MARKER are kept."""

from __future__ import annotations

import os
import platform
import re
import subprocess
from collections.abc import Sequence
from pathlib import Path

from results import Result, Section

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
NOTES_MARKER = "<!-- notes below this line are written by hand and kept when run.py rewrites the tables -->"
SPEED = "Speed (issue 2)"
HEALING = "Self-healing under load and faults (issue 3)"
ROUTING = "Routing without reloads (issue 8)"
VERSIONS = "Versions and traffic"
TITLES = (SPEED, HEALING, ROUTING, VERSIONS)  # in the order of RESULTS.md


def machine() -> str:
    """One line on the hardware and the versions that the numbers depend on."""
    cpu = "unknown CPU"
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    memory = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30)
    docker_version = subprocess.run(["docker", "version", "--format", "{{.Server.Version}}"],
                                    capture_output=True, text=True, check=False).stdout.strip()
    nginx = subprocess.run(["nginx", "-v"], capture_output=True, text=True,
                           check=False).stderr.strip().replace("nginx version: ", "")
    return (f"{platform.platform()}, {os.cpu_count()} cores ({cpu}), {memory} GiB, Python {platform.python_version()}, "
            f"Docker {docker_version or '?'}, {nginx}")


HEADER = ["| benchmark | measured | target | met | notes |", "| --- | --- | --- | --- | --- |"]


def row(r: Result) -> str:
    return f"| {r.name} | {r.cell()} | {r.target} | {r.met()} | {r.note.replace('|', '/')} |"


def table(results: list[Result], carried: Sequence[str] = ()) -> str:
    return "\n".join([*HEADER, *map(row, results), *carried])


def _old_block(old: str, title: str) -> str | None:
    block = re.search(rf"## {re.escape(title)}\n\n(.*?)(?=\n## |\n{re.escape(NOTES_MARKER)}|\Z)", old, re.DOTALL)
    return block.group(1).strip() if block else None


def _merged(results: list[Result], block: str | None, since: str) -> str:
    """The previous table with the rows measured now in place of theirs (by name); the others marked as
    carried over, measured rows it did not have at its end."""
    if block is not None and block.startswith("(carried over"):
        since = block[1:block.index(")")]  # the section was carried already: its rows are that old
    fresh = {r.name: r for r in results}
    lines = list(HEADER)
    for line in (block or "").splitlines():
        if not line.startswith("| ") or line in HEADER:
            continue
        name = line[2:].split(" | ", 1)[0]
        if name in fresh:
            lines.append(row(fresh.pop(name)))
        else:
            lines.append(line if "carried over" in line else line[:-2].rstrip() + f" ({since}) |")
    return "\n".join([*lines, *map(row, fresh.values())])


def _sections_text(old: str, sections: list[Section], engine_restarted: bool) -> list[str]:
    """Every section, in order; what this run did not measure is kept from the previous RESULTS.md, marked so."""
    when = re.search(r"Measured (.+?) on ", old)
    since = f"carried over from the run of {when.group(1) if when else 'an earlier date'}"
    measured = {s.title: s for s in sections}
    texts = []
    for title in TITLES:
        section = measured.get(title)
        if section is None:
            text = _old_block(old, title)
            if text:
                texts.append(f"## {title}\n\n" + (text if text.startswith("(carried over") else f"({since})\n\n{text}"))
            continue
        if section.partial:
            texts.append(f"## {title}\n\n{_merged(section.results, _old_block(old, title), since)}")
            continue
        carried = []
        if title == HEALING and not engine_restarted:
            for line in old.splitlines():
                if line.startswith("| (e)"):
                    carried.append(line if "carried over" in line
                                   else line[:-2] + f" ({since} with --engine-restart) |")
        texts.append(f"## {title}\n\n{table(section.results, carried)}")
    return texts


def write_report(sections: list[Section], context: str, engine_restarted: bool) -> None:
    """Prints the tables and writes RESULTS.md: ``context`` (where and how it was measured), then the tables."""
    old = RESULTS.read_text() if RESULTS.exists() else ""
    body = "\n\n".join(_sections_text(old, sections, engine_restarted))
    print(body)
    notes = old.split(NOTES_MARKER, 1)[1] if NOTES_MARKER in old else "\n"
    RESULTS.write_text(f"# Benchmark results\n\n{context}\n\n{body}\n\n{NOTES_MARKER}{notes}")
