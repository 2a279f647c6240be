"""Uniform: every unit at the same level. When the budget lies between two levels, units are
raised to the next level in an interleaved order (every k-th unit of each unit type) until the
budget is used, so the mix is spread evenly over depth."""
from __future__ import annotations

import dataclasses

from .base import ALLOCATORS, Allocator
from .problem import Problem, fill


@ALLOCATORS.register("uniform")
@dataclasses.dataclass
class Uniform(Allocator):
    def allocate(self, problem: Problem, fitness=None) -> list[int]:
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


def _bitrev(i: int, n: int) -> int:
    bits = max(1, (n - 1).bit_length())
    return int(format(i, f"0{bits}b")[::-1], 2)
