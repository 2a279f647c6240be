"""OWL (outlier-weighted layer-wise sparsity): blocks with more outlier weights (Wanda score
> M x its mean) get lower sparsity, spread over [S - λ, S + λ] around the target S; the plan is
then fitted to the exact budget."""
from __future__ import annotations

import dataclasses

from ..errors import ConfigError
from .base import ALLOCATORS, Allocator
from .problem import Problem, fit


@ALLOCATORS.register("owl")
@dataclasses.dataclass
class OWL(Allocator):
    lam: float = 0.08

    needs = ("outlier_ratio",)

    def allocate(self, problem: Problem, fitness=None) -> list[int]:
        ratio = problem.extra.get("outlier_ratio")
        block = problem.extra.get("block")
        numel = problem.extra.get("numel")
        if ratio is None or block is None or numel is None or problem.labels is None:
            raise ConfigError("owl needs a sparsity level database (outlier ratios per unit)")
        total = sum(numel)
        target = 1.0 - problem.budget / total  # budget counts kept weights
        blocks = sorted(set(block))
        d = {b: sum(r * n for r, n, bb in zip(ratio, numel, block) if bb == b) /
             sum(n for n, bb in zip(numel, block) if bb == b) for b in blocks}
        lo, hi = min(d.values()), max(d.values())
        span = (hi - lo) or 1.0
        # more outliers -> less sparsity, linearly over [S - λ, S + λ]
        s = {b: target + self.lam - 2 * self.lam * (d[b] - lo) / span for b in blocks}
        shift = target - sum(s[b] * sum(n for n, bb in zip(numel, block) if bb == b) for b in blocks) / total
        choice = []
        for u in range(len(problem.units)):
            want = s[block[u]] + shift
            labels = problem.labels[u]  # sparsity of each level
            choice.append(min(range(len(labels)), key=lambda i: abs(labels[i] - want)))
        return fit(problem, choice)
