"""The allocation problem every allocator solves, free of any model.

A `Problem` lists units, each with its levels in increasing cost order; every level has an
integer cost (in the budget's unit: nominal bits, bytes, kept weights or kept sub-blocks) and an
error estimate. A plan picks one level index per unit; the budget is an upper bound on the
total cost. `fill` and `trim` bring any plan to "at most the budget, and less than one level step
below it" — the exactness guarantee every allocator gives.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

from ..errors import BudgetError


@dataclasses.dataclass
class Problem:
    units: list[str]
    costs: list[list[int]]  # costs[u][i], strictly increasing in i
    errors: list[list[float]]  # errors[u][i]: per-unit error estimate at level i
    budget: int  # upper bound on Σ cost
    labels: list[list] | None = None  # level value per index (e.g. bits), for plans and reports
    groups: list[str] | None = None  # unit type (e.g. "q_proj"), for reports and uniform fill
    extra: dict = dataclasses.field(default_factory=dict)  # allocator-specific data (e.g. outlier ratios)

    def __post_init__(self) -> None:
        if not (len(self.units) == len(self.costs) == len(self.errors)):
            raise ValueError("units, costs and errors must have the same length")
        for u, c in zip(self.units, self.costs):
            if not c or any(b <= a for a, b in zip(c, c[1:])):
                raise ValueError(f"levels of {u} must have strictly increasing costs: {c}")
        lo = self.min_cost()
        if self.budget < lo:
            raise BudgetError(f"budget {self.budget} is below the cheapest plan ({lo}); "
                              "raise the budget or allow cheaper levels")

    def members(self, u: int) -> list[str]:
        """The database units problem unit `u` stands for: itself, or the layers tied into it
        (e.g. q/k/v, which a serving engine runs as one fused matmul with one scheme)."""
        tied = self.extra.get("members")
        return list(tied[u]) if tied else [self.units[u]]

    def min_cost(self) -> int:
        return sum(c[0] for c in self.costs)

    def max_cost(self) -> int:
        return sum(c[-1] for c in self.costs)

    def cost(self, choice: Sequence[int]) -> int:
        return sum(self.costs[u][i] for u, i in enumerate(choice))

    def error(self, choice: Sequence[int]) -> float:
        return sum(self.errors[u][i] for u, i in enumerate(choice))

    def n_levels(self, u: int) -> int:
        return len(self.costs[u])

    def step_up(self, u: int, i: int) -> int | None:
        return self.costs[u][i + 1] - self.costs[u][i] if i + 1 < len(self.costs[u]) else None

    def slack_ok(self, choice: Sequence[int]) -> bool:
        """Within budget, and no single one-level upgrade would still fit (< one level step below)."""
        left = self.budget - self.cost(choice)
        if left < 0:
            return False
        steps = [self.step_up(u, i) for u, i in enumerate(choice)]
        return all(s is None or s > left for s in steps)


def _gain(p: Problem, u: int, i: int) -> float:
    """Error reduction per unit cost of moving unit u from level i to i + 1."""
    return (p.errors[u][i] - p.errors[u][i + 1]) / (p.costs[u][i + 1] - p.costs[u][i])


def fill(p: Problem, choice: list[int], order: Callable[[int, int], float] | None = None) -> list[int]:
    """Upgrade units one level at a time while it fits, best `order` score first
    (default: largest error reduction per cost). Ends less than one level step below the budget."""
    choice = list(choice)
    left = p.budget - p.cost(choice)
    score = order or (lambda u, i: _gain(p, u, i))
    while True:
        best, best_s = None, None
        for u, i in enumerate(choice):
            s = p.step_up(u, i)
            if s is not None and s <= left:
                sc = score(u, i)
                if best is None or sc > best_s:
                    best, best_s = u, sc
        if best is None:
            return choice
        left -= p.step_up(best, choice[best])
        choice[best] += 1


def trim(p: Problem, choice: list[int]) -> list[int]:
    """Downgrade units (smallest error increase per cost saved first) until within budget."""
    choice = list(choice)
    over = p.cost(choice) - p.budget
    while over > 0:
        best, best_s = None, math.inf
        for u, i in enumerate(choice):
            if i > 0:
                sc = _gain(p, u, i - 1)
                if sc < best_s:
                    best, best_s = u, sc
        if best is None:
            raise BudgetError("budget cannot be met")
        over -= p.costs[best][choice[best]] - p.costs[best][choice[best] - 1]
        choice[best] -= 1
    return choice


def fit(p: Problem, choice: list[int], order=None) -> list[int]:
    """trim then fill: the exactness guarantee for any starting plan."""
    return fill(p, trim(p, choice), order)
