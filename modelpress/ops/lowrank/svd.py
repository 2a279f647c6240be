"""Low-rank factorization W ≈ B·A stored as two float16 factors (real parameter and byte savings).

`svd`: plain truncated SVD of W. `asvd`: activation-aware, truncated in the eigenspace of XᵀX
(whiten, truncate, un-whiten), so the layer *output* error is minimal for the rank.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from ...calib.stats import LinearStats
from ...errors import ConfigError
from ..base import OPERATORS, WeightOperator
from ..packed import PackedWeight
from .factor import activation_aware, truncated


def _rank(rank: int | None, ratio: float | None, shape) -> int:
    if (rank is None) == (ratio is None):
        raise ConfigError("give exactly one of rank or rank_ratio")
    if rank is not None:
        if rank < 1:
            raise ConfigError("rank must be >= 1")
        return min(rank, min(shape))
    if not 0 < ratio <= 1:
        raise ConfigError("rank_ratio must be in (0, 1]")
    return max(1, int(ratio * shape[0] * shape[1] / (shape[0] + shape[1])))


def _packed(w: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> PackedWeight:
    return PackedWeight(shape=tuple(w.shape), lr_b=b.to(torch.float16), lr_a=a.to(torch.float16))


@OPERATORS.register("svd")
@dataclasses.dataclass
class SVD(WeightOperator):
    rank: int | None = None
    rank_ratio: float | None = None  # share of the dense parameter count the factors may use

    stats: ClassVar[str] = "none"

    def __post_init__(self) -> None:
        if (self.rank is None) == (self.rank_ratio is None):
            raise ConfigError("give exactly one of rank or rank_ratio")

    def compress(self, weight: torch.Tensor, stats: LinearStats | None) -> PackedWeight:
        b, a = truncated(weight, _rank(self.rank, self.rank_ratio, weight.shape))
        return _packed(weight, b, a)

    def label(self) -> str:
        return f"svd r{self.rank}" if self.rank else f"svd {self.rank_ratio:g}"


@OPERATORS.register("asvd")
@dataclasses.dataclass
class ActivationSVD(SVD):
    damp: float = 0.01

    stats: ClassVar[str] = "xtx"

    def compress(self, weight: torch.Tensor, stats: LinearStats | None) -> PackedWeight:
        b, a = activation_aware(weight, stats.hessian, _rank(self.rank, self.rank_ratio, weight.shape), self.damp)
        return _packed(weight, b, a)

    def label(self) -> str:
        return "a" + super().label()
