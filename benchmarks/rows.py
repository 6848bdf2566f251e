"""What every figure of `benchmarks.run` is reported as: a Row of the table, from repeated measurements (Stats)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field


@dataclass
class Row:
    id: str
    figure: str
    ours: str  # what was measured, medians with (min–max)
    baseline: str
    ratio: float | None  # the figure
    spread: str  # min–max of the ratio over repeats, or how it was obtained
    target: str
    met: bool | None
    note: str = ""


@dataclass
class Stats:
    values: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def fmt(self, unit: str = "s", digits: int = 3) -> str:
        if len(self.values) == 1:
            return f"{self.values[0]:.{digits}g} {unit} (n=1)"
        return (
            f"{self.median:.{digits}g} {unit} ({min(self.values):.{digits}g}–{max(self.values):.{digits}g}, "
            f"n={len(self.values)})"
        )

    def range(self, digits: int = 3) -> str:
        return f"{min(self.values):.{digits}g}–{max(self.values):.{digits}g} (n={len(self.values)})"
