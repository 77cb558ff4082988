"""Several seeds, one number: the mean and spread that the book reports where seeds disagree.

A run on a few thousand images is one draw: another seed (or another CPU's kernels) moves its
accuracy by points. Where that spread is comparable to an effect the text discusses, the book
runs ``SEEDS`` and reports a ``Spread``: mean, sample standard deviation and range.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

SEEDS = (0, 1, 2)  # experiments.per_seed runs an experiment once for each


@dataclass(frozen=True)
class Spread:
    """Summary of one result over seeds. values: one per seed, in the unit of the result."""
    values: tuple[float, ...]

    def __post_init__(self):
        if len(self.values) == 0:
            raise ValueError("a Spread needs at least one value")
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in self.values):
            raise ValueError(f"a Spread needs finite numbers, got {self.values!r}")

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return math.fsum(self.values) / self.n

    @property
    def std(self) -> float:
        """Sample standard deviation (n - 1 in the denominator); 0 for a single value."""
        if self.n < 2:
            return 0.0
        m = self.mean
        return math.sqrt(math.fsum((v - m) ** 2 for v in self.values) / (self.n - 1))

    @property
    def min(self) -> float:
        return min(self.values)

    @property
    def max(self) -> float:
        return max(self.values)

    def above(self, other: "Spread") -> bool:
        """True if every seed of this result is above every seed of ``other``: their ranges do
        not overlap. The book's test for "beats by more than the spread"."""
        return self.min > other.max

    def pct(self, digits: int = 1) -> str:
        """As a percentage with its spread, e.g. ``'69.9% ± 2.1'`` (mean ± standard deviation);
        a single run has no spread: ``'69.9% (one run)'``."""
        if self.n < 2:
            return f"{100 * self.mean:.{digits}f}% (one run)"
        return f"{100 * self.mean:.{digits}f}% ± {100 * self.std:.{digits}f}"

    def fmt(self, digits: int = 3) -> str:
        """``'1.784 ± 0.012'``: mean ± standard deviation; ``'1.916 (one run)'`` for a single run."""
        if self.n < 2:
            return f"{self.mean:.{digits}f} (one run)"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"


def spread(values: Iterable[float]) -> Spread:
    """A ``Spread`` of ``values`` (one per seed)."""
    return Spread(tuple(float(v) for v in values))


def paired_gap(a: Spread, b: Spread) -> Spread:
    """The ``Spread`` of the per-seed differences a - b of two results over the same seeds, in
    the same order (a paired comparison: what a seed changes for both alike cancels)."""
    if a.n != b.n:
        raise ValueError(f"paired results need the same seeds, got {a.n} and {b.n} values")
    return spread(x - y for x, y in zip(a.values, b.values))


def final(histories: Sequence, key: str = "test_acc") -> Spread:
    """The ``Spread`` over seeds of each History's last value of ``key`` (e.g. ``test_acc``)."""
    return spread(getattr(h, key)[-1] for h in histories)
