"""What a benchmark yields: rows of a results table, grouped in sections."""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field


class BenchError(RuntimeError):
    """A benchmark could not take its measurement."""


@dataclass
class Result:
    name: str
    value: float | None
    unit: str
    target: str
    ok: bool | None  # None: information, no target
    note: str = ""

    def cell(self) -> str:
        if self.value is None:
            return "error"
        if self.unit == "yes/no":
            return "yes" if self.value else "no"
        if self.unit in ("requests", "commands"):
            return f"{self.value:.0f}"
        number = f"{self.value:.2f}" if abs(self.value) < 100 else f"{self.value:.0f}"
        return f"{number} {self.unit}".strip()

    def met(self) -> str:
        return "-" if self.ok is None else ("yes" if self.ok else "**NO**")


@dataclass
class Section:
    title: str
    results: list[Result] = field(default_factory=list)
    partial: bool = False  # only some of its rows measured: the others are carried over from the last table


def one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: " + " ".join(str(exc).split())[:300]


def run_scenarios(scenarios: list[tuple[str, Callable[[], list[Result]]]]) -> list[Result]:
    """Each scenario's rows, in order; one that fails becomes a row saying so, and the others still run."""
    results: list[Result] = []
    for name, scenario in scenarios:
        started = time.monotonic()
        print(f"-- {name}", flush=True)
        try:
            results += scenario()
        except Exception as exc:  # noqa: BLE001 - one scenario failing must not lose the others' numbers
            traceback.print_exc()
            results.append(Result(f"{name} (did not complete)", None, "", "-", False, one_line(exc)))
        print(f"   {time.monotonic() - started:.0f}s", flush=True)
    return results
