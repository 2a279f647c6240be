"""Magnitude pruning: drop the smallest |w| in the layer (or in every N:M group)."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from ...calib.stats import LinearStats
from ..base import OPERATORS, SparsityTarget, WeightOperator, lowest_mask, nm_mask
from ..packed import PackedWeight


@OPERATORS.register("magnitude")
@dataclasses.dataclass
class Magnitude(SparsityTarget, WeightOperator):
    stats: ClassVar[str] = "none"

    def __post_init__(self) -> None:
        self.check()

    def compress(self, weight: torch.Tensor, stats: LinearStats | None) -> PackedWeight:
        score = weight.float().abs()
        nm = self.nm()
        mask = nm_mask(score, *nm) if nm else lowest_mask(score, self.count(score.numel()))
        return PackedWeight(shape=tuple(weight.shape), mask=mask, values=weight[mask].to(torch.float16))

    def label(self) -> str:
        return f"magnitude {SparsityTarget.label(self)}"
