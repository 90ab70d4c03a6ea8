"""Median and spread of repeated cells.

Figures on a shared 2-core machine move between repetitions; a single number hides that. Each
cell is repeated (interleaved across systems, so that a slow minute hurts every system alike) and
reported as its median with the spread of the repetitions around it.
"""
from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Summary:
    """Median, extremes and count of one metric over the repetitions of a cell."""

    median: float
    lo: float
    hi: float
    n: int

    @property
    def spread(self) -> float:
        """Half the range, relative to the median (0.05 means "±5 %"); 0 for one value or a
        zero median."""
        if self.n < 2 or self.median == 0:
            return 0.0
        return (self.hi - self.lo) / 2 / abs(self.median)

    def to_json(self) -> dict[str, float | int]:
        return {"median": self.median, "min": self.lo, "max": self.hi, "n": self.n,
                "spread": round(self.spread, 4)}


def summarize(values: Iterable[float]) -> Summary | None:
    """Summary of the finite values given; None if there are none (a cell that never ran)."""
    vals = [float(v) for v in values if v is not None and v == v]  # drop None and NaN
    if not vals:
        return None
    return Summary(median=statistics.median(vals), lo=min(vals), hi=max(vals), n=len(vals))


def ratio(value: float | None, reference: float | None) -> float | None:
    """value / reference, or None when either is missing or the reference is zero."""
    if value is None or reference is None or reference == 0:
        return None
    return value / reference


def interleave(reps: int, groups: Sequence[Sequence[str]]) -> list[tuple[int, list[str]]]:
    """The rounds of a run: per repetition, every group of systems once (a group shares one lab:
    the peers run on a lab without a balancer, each lbcore variant on its own). The order of the
    groups, and of the systems inside a group, is rotated by one each repetition, so that no
    system always runs first (just after a lab was built) or last."""
    out: list[tuple[int, list[str]]] = []
    n = len(groups)
    for r in range(reps):
        k = r % n if n else 0
        for g in list(groups[k:]) + list(groups[:k]):
            m = r % len(g) if g else 0
            out.append((r, list(g[m:]) + list(g[:m])))
    return out
