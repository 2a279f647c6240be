"""sparsity: units = Linear layers; levels = SparseGPT pruning in equal *absolute* steps (the same
number of weights per step for every layer, so moving one unit up and another down keeps the
total exact). Built on the dense model's inputs; each unit also records its OWL outlier ratio."""
from __future__ import annotations

import dataclasses
import math

from ...errors import BudgetError, ConfigError
from ...models.arch import get_weight
from ...ops.base import output_error
from ..build import on_dense_inputs
from .base import KINDS, Kind, UnitInfo


@KINDS.register("sparsity")
@dataclasses.dataclass
class SparsityKind(Kind):
    max_sparsity: float = 0.9
    step: int | None = None  # weights per level step; default: the largest unit gets `max_levels` levels
    max_levels: int = 24
    damp: float = 0.01
    outlier_m: float = 5.0  # OWL: a weight is an outlier when its Wanda score > M x the layer mean
    refit_iters: int = 30  # SparseGPT's refit of the kept weights (0: the plain sweep)

    budgets = ("sparsity", "mb")
    default_for = ("sparsity",)
    options = {"max-sparsity": "max_sparsity"}
    tensors_per_unit = 2
    ylabel = "pruned weights"
    legacy = {"refit_iters": 0}

    def __post_init__(self) -> None:
        if not 0 < self.max_sparsity <= 0.95:
            raise ConfigError("max_sparsity must be in (0, 0.95]")

    def resolve_step(self, units: list[UnitInfo]) -> int:
        if self.step is None:
            biggest = max(u.numel for u in units)
            self.step = max(1, math.ceil(self.max_sparsity * biggest / (self.max_levels - 1)))
        return self.step

    def resolve(self, model) -> None:  # the stored settings hold the resolved step
        if self.step is None:
            self.resolve_step(self.discover(model))

    def values(self, unit: UnitInfo) -> list:
        """Numbers of pruned weights, most pruned (cheapest) first."""
        k = int(self.max_sparsity * unit.numel) // self.step
        return [j * self.step for j in range(k, -1, -1)]

    def labels(self, unit: UnitInfo, values: list) -> list:
        return [int(x) / unit.numel for x in values]  # the sparsity of each level

    def check_budget(self, budget) -> None:
        if budget.kind == "sparsity" and not 0 <= budget.value <= self.max_sparsity:
            raise BudgetError(f"target sparsity {budget.value:g} is outside 0..{self.max_sparsity:g}")

    def missing(self, db) -> dict[str, list]:
        """As every kind's, plus every level of a unit whose outlier ratio (kept in db.json) was
        lost: a run killed after the unit's file was written and before db.json."""
        out = super().missing(db)
        for u, info in db.units.items():
            if u not in out and "outlier_ratio" not in info.extra:
                out[u] = self.values(info)
        return out

    def operator(self, n_prune: int):
        from ...ops import OPERATORS

        return OPERATORS.build("sparsegpt", n_prune=n_prune, damp=self.damp, refit_iters=self.refit_iters)

    def build(self, db, model, windows, batch_size, device) -> None:
        def per_layer(n, mod, st, want) -> None:
            w = get_weight(mod).float()
            new = {}
            for v in want:
                pw = self.operator(int(v)).compress(w, st)
                new[v] = (pw, output_error(w, pw.dequantize(), st.hessian))
            score = w.abs() * st.col_norms.unsqueeze(0)
            db.set_unit_extra(n, outlier_ratio=float((score > self.outlier_m * score.mean()).float().mean()))
            db.add_levels(n, new)

        on_dense_inputs(db, model, windows, batch_size, device, "database sparsity", per_layer,
                        after_block=lambda step: db.save_meta())
