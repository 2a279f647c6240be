"""Dynamic programming (knapsack): minimise the *sum* of per-unit errors under the budget.

Optimal if errors added up; they do not (EvoPress), which is why this is the baseline to beat.
Costs are divided by their greatest common step; if the table would still be too large, costs
are rounded up to a coarser grid (the plan stays feasible) and the leftover is filled greedily.
"""
from __future__ import annotations

import dataclasses
import math
from functools import reduce

import numpy as np

from .base import ALLOCATORS, Allocator
from .problem import Problem, fill


@ALLOCATORS.register("dp")
@dataclasses.dataclass
class DP(Allocator):
    max_cells: int = 20_000_000

    def allocate(self, problem: Problem, fitness=None) -> list[int]:
        n = len(problem.units)
        base = [c[0] for c in problem.costs]
        deltas = [[c - c0 for c in cs] for cs, c0 in zip(problem.costs, base)]
        g = reduce(math.gcd, (d for ds in deltas for d in ds if d), 0) or 1
        cap = problem.budget - sum(base)
        scale = g
        width = cap // scale
        if (width + 1) * n > self.max_cells:
            scale = g * math.ceil((width + 1) * n / self.max_cells)
            width = cap // scale
        inf = np.inf
        best = np.full(width + 1, inf)
        best[0] = 0.0
        arg = np.zeros((n, width + 1), dtype=np.int16)
        for u in range(n):
            new = np.full(width + 1, inf)
            for i, d in enumerate(deltas[u]):
                w = -(-d // scale)  # round up: never exceed the budget
                if w > width:
                    continue
                cand = np.full(width + 1, inf)
                cand[w:] = best[: width + 1 - w] + problem.errors[u][i]
                better = cand < new
                new[better] = cand[better]
                arg[u][better] = i
            best = new
        c = int(np.argmin(best))  # lowest error; ties -> smallest cost index
        choice = [0] * n
        for u in range(n - 1, -1, -1):
            i = int(arg[u][c])
            choice[u] = i
            c -= -(-deltas[u][i] // scale)
        return fill(problem, choice)
