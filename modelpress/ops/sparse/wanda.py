"""Wanda: prune by |w| · ‖X_j‖ within each output row (Sun et al., 2023); no weight update."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from ...calib.stats import LinearStats
from ..base import OPERATORS, SparsityTarget, WeightOperator, nm_mask, split_count
from ..packed import PackedWeight


@OPERATORS.register("wanda")
@dataclasses.dataclass
class Wanda(SparsityTarget, WeightOperator):
    stats: ClassVar[str] = "norms"

    def __post_init__(self) -> None:
        self.check()

    def compress(self, weight: torch.Tensor, stats: LinearStats | None) -> PackedWeight:
        w = weight.float()
        score = w.abs() * stats.col_norms.to(w.device).unsqueeze(0)
        nm = self.nm()
        if nm:
            mask = nm_mask(score, *nm)
        else:  # per-row comparison groups, the same count in every row (up to one)
            out_f, in_f = w.shape
            per_row = split_count(self.count(w.numel()), [in_f] * out_f)
            order = torch.argsort(score, dim=1)
            rank = torch.empty_like(order)
            rank.scatter_(1, order, torch.arange(in_f, device=w.device).expand(out_f, in_f))
            mask = rank >= torch.tensor(per_row, device=w.device).unsqueeze(1)
        return PackedWeight(shape=tuple(w.shape), mask=mask, values=weight[mask].to(torch.float16))

    def label(self) -> str:
        return f"wanda {SparsityTarget.label(self)}"
