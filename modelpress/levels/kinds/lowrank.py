"""lowrank: units = Linear layers; levels = ranks of an activation-aware SVD (and dense), in bytes."""
from __future__ import annotations

import dataclasses

import torch

from ...errors import ConfigError
from ...models.arch import get_weight
from ...ops.base import output_error
from ...ops.packed import PackedWeight
from ..build import on_dense_inputs
from .base import KINDS, Kind, UnitInfo, pareto


@KINDS.register("lowrank")
@dataclasses.dataclass
class LowRankKind(Kind):
    """Levels are ranks of an activation-aware SVD (W ≈ B·A, both float16), named "r<rank>", plus
    "dense" (the float16 weight). Each rank keeps a share (`ratios`) of the dense layer's bytes:
    rank = ratio · out·in / (out + in). Built from dense-input statistics; one eigendecomposition
    of XᵀX and one SVD per layer give every rank. Levels are Pareto-pruned like joint ones."""

    ratios: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
    dense: bool = True
    damp: float = 0.01

    budgets = ("mb",)
    options = {"ratios": "ratios"}
    tensors_per_unit = 2

    def __post_init__(self) -> None:
        self.ratios = tuple(sorted(set(float(r) for r in self.ratios)))
        if not self.ratios or any(not 0 < r < 1 for r in self.ratios):
            raise ConfigError(f"low-rank ratios are shares of the dense bytes in (0, 1), got {self.ratios}")

    def ranks(self, unit: UnitInfo) -> list[int]:
        out_f, in_f = unit.shape
        full = out_f * in_f / (out_f + in_f)
        return sorted({max(1, min(int(r * full), min(out_f, in_f))) for r in self.ratios})

    def values(self, unit: UnitInfo) -> list:
        return [f"r{r}" for r in self.ranks(unit)] + (["dense"] if self.dense else [])

    def order(self, unit: UnitInfo, built: dict[str, dict]) -> list:
        return pareto(built)

    def build(self, db, model, windows, batch_size, device) -> None:
        from ...ops.lowrank.factor import activation_aware_ranks

        def per_layer(n, mod, st, want) -> None:
            w = get_weight(mod).float()
            h = st.hessian
            factors = activation_aware_ranks(w, h, [int(v[1:]) for v in want if v != "dense"], self.damp)
            new = {}
            for v in want:
                if v == "dense":
                    pw = PackedWeight(shape=tuple(w.shape), values=w.to(torch.float16).reshape(-1))
                else:
                    b, a = factors[int(v[1:])]
                    pw = PackedWeight(shape=tuple(w.shape), lr_b=b.to(torch.float16), lr_a=a.to(torch.float16))
                new[v] = (pw, output_error(w, pw.dequantize(), h))
            db.add_levels(n, new)

        on_dense_inputs(db, model, windows, batch_size, device, "database lowrank", per_layer)
