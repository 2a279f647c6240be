"""Uniform: every unit at the same level. When the budget lies between two levels, units are
raised to the next level in an interleaved order (every k-th unit of each unit type) until the
budget is used, so the mix is spread evenly over depth."""
from __future__ import annotations

import dataclasses

from .base import ALLOCATORS, Allocator
from ..errors import BudgetError
from .problem import Problem, fill, fit


@ALLOCATORS.register("uniform")
@dataclasses.dataclass
class Uniform(Allocator):
    def allocate(self, problem: Problem, fitness=None) -> list[int]:
        named = same_name(problem)
        if named is not None:
            return named
        n = len(problem.units)
        # the highest common level index whose all-units cost fits
        top = min(problem.n_levels(u) for u in range(n)) - 1
        base = 0
        for i in range(top + 1):
            if problem.cost([min(i, problem.n_levels(u) - 1) for u in range(n)]) <= problem.budget:
                base = i
        choice = [min(base, problem.n_levels(u) - 1) for u in range(n)]
        # bit-reversal order spreads the upgrades evenly over the units of each type
        rank = {}
        groups = problem.groups or ["all"] * n
        members: dict[str, list[int]] = {}
        for u, g in enumerate(groups):
            members.setdefault(g, []).append(u)
        for g, us in members.items():
            for r, u in enumerate(sorted(us, key=lambda u: _bitrev(us.index(u), len(us)))):
                rank[u] = -r / max(len(us), 1)
        return fill(problem, choice, order=lambda u, i: (-(i - base), rank[u]))


def same_name(p: Problem) -> list[int] | None:
    """For named levels that differ between units (Pareto-pruned combinations under a byte budget,
    where "the same index" means different levels in different layers): every unit at the same
    level name, the most expensive one whose plan is at most 1% over the budget, brought within it
    by `fit` (cheapest downgrades by layer-wise error, then fill). A unit whose list lacks the
    name (pruned: a cheaper level was more accurate there) takes its most expensive level costing no
    more than the name costs in a unit of its group. None when the levels are not named that way."""
    labels = p.labels
    if not labels or not all(isinstance(v, str) for vs in labels for v in vs) or len({tuple(v) for v in labels}) == 1:
        return None
    groups = p.groups or ["all"] * len(p.units)
    price: dict[tuple[str, str], int] = {}
    for u, vs in enumerate(labels):
        for i, v in enumerate(vs):
            price.setdefault((groups[u], v), p.costs[u][i])
    best = None
    for name in sorted({v for vs in labels for v in vs}):
        choice = []
        for u, vs in enumerate(labels):
            if name in vs:
                choice.append(vs.index(name))
                continue
            c = price.get((groups[u], name))
            ok = [i for i in range(len(vs)) if c is not None and p.costs[u][i] <= c]
            if not ok:
                break
            choice.append(ok[-1])
        else:
            if p.cost(choice) <= 1.01 * p.budget and (best is None or p.cost(choice) > p.cost(best)):
                best = choice
    if best is None:
        return None
    try:
        return fit(p, best)
    except BudgetError:
        return None


def _bitrev(i: int, n: int) -> int:
    bits = max(1, (n - 1).bit_length())
    return int(format(i, f"0{bits}b")[::-1], 2)
