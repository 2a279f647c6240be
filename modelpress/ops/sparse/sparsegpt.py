"""SparseGPT: prune with OBS weight updates, mask chosen adaptively per block of columns
(Frantar & Alistarh, 2023). Optionally quantizes the kept weights in the same sweep."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from ...calib.stats import LinearStats
from ..base import OPERATORS, SparsityTarget, WeightOperator, check_bits, check_group_size
from ..obs import obs_sweep, to_packed
from ..packed import PackedWeight


@OPERATORS.register("sparsegpt")
@dataclasses.dataclass
class SparseGPT(SparsityTarget, WeightOperator):
    bits: int | None = None  # also quantize the kept weights (joint sparse + quantized)
    group_size: int | None = 64
    sym: bool = False
    damp: float = 0.01
    block_size: int = 128

    stats: ClassVar[str] = "xtx"

    def __post_init__(self) -> None:
        self.check()
        if self.bits is not None:
            check_bits(self.bits)
        check_group_size(self.group_size)

    def compress(self, weight: torch.Tensor, stats: LinearStats | None) -> PackedWeight:
        nm = self.nm()
        res = obs_sweep(weight, stats.hessian, bits=self.bits, group_size=self.group_size, sym=self.sym,
                        n_prune=None if nm else self.count(weight.numel()), nm=nm,
                        damp=self.damp, block_size=self.block_size)
        return to_packed(res, self.bits, self.group_size, self.sym)

    def label(self) -> str:
        q = f" w{self.bits}" if self.bits else ""
        return f"sparsegpt {SparsityTarget.label(self)}{q}"
