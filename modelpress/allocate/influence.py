"""Block influence (ShortGPT) for depth: drop the sub-blocks whose removal turns the residual
stream least (1 − cos between their input and output)."""
from __future__ import annotations

import dataclasses

from ..errors import ConfigError
from .base import ALLOCATORS, Allocator
from .problem import Problem, fit


@ALLOCATORS.register("block-influence")
@dataclasses.dataclass
class BlockInfluence(Allocator):
    needs = ("influence",)

    def allocate(self, problem: Problem, fitness=None) -> list[int]:
        infl = problem.extra.get("influence")
        if infl is None:
            raise ConfigError("block-influence needs a depth level database (influence per sub-block)")
        n = len(problem.units)
        choice = [problem.n_levels(u) - 1 for u in range(n)]  # all kept
        for u in sorted(range(n), key=lambda u: infl[u]):
            if problem.cost(choice) <= problem.budget:
                break
            choice[u] = 0
        return fit(problem, choice, order=lambda u, i: -infl[u])
