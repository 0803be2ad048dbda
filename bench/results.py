"""What a benchmark yields: rows of a results table, grouped in sections."""

from __future__ import annotations

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
