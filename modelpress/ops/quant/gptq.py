"""GPTQ: quantize column by column, compensating each column's error with the inverse Hessian
(Frantar et al., 2022). Ragged last groups are fine: groups need not divide in_features."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from ...calib.stats import LinearStats
from ...errors import ConfigError
from ..base import OPERATORS, WeightOperator, check_bits, check_group_size
from ..obs import obs_sweep, shrink_hessian, to_packed
from ..packed import PackedWeight


@OPERATORS.register("gptq")
@dataclasses.dataclass
class GPTQ(WeightOperator):
    bits: int = 4
    group_size: int | None = 64
    sym: bool = False
    act_order: bool = True  # columns with large activations first (groups follow that order)
    # with act_order: groups stay runs of columns in the original order, their ranges fixed before the
    # sweep (compressed-tensors / vLLM store only such groups: their actorder "weight")
    static_groups: bool = False
    damp: float = 0.01  # fraction of mean(diag H) added to the diagonal
    # H blended with its diagonal (obs.shrink_hessian): less fit to the calibration text. 0.1 measured on
    # smollm2 3-bit, mix+self calibration: worst domain ratio 1.589 -> 1.413 (docs/benchmarks.md)
    shrink: float = 0.1
    mse: bool = True  # clipping search for each group's range (3-bit smollm2: 1.69x -> 1.33x of dense ppl)
    clip_by: str = "weights"  # the clipping search's error: "weights" alike, or by "activations" (diag H)
    block_size: int = 128

    stats: ClassVar[str] = "xtx"

    def __post_init__(self) -> None:
        check_bits(self.bits)
        check_group_size(self.group_size)
        if not 0.0 <= self.shrink <= 1.0:
            raise ConfigError(f"shrink must be in [0, 1], got {self.shrink!r}")
        if self.clip_by not in ("weights", "activations"):
            raise ConfigError(f"clip_by is weights or activations, got {self.clip_by!r}")

    def compress(self, weight: torch.Tensor, stats: LinearStats | None) -> PackedWeight:
        # H goes straight into the sweep, which frees it once factored (memory of wide layers)
        res = obs_sweep(weight, shrink_hessian(stats.hessian, self.shrink, inplace=True), own_h=True, bits=self.bits, group_size=self.group_size, sym=self.sym,
                        mse=self.mse, act_order=self.act_order, damp=self.damp, block_size=self.block_size,
                        clip_by=self.clip_by, static_groups=self.static_groups)
        return to_packed(res, self.bits, self.group_size, self.sym)

    def label(self) -> str:
        return f"gptq w{self.bits}" + (f" g{self.group_size}" if self.group_size else "") + ("" if self.mse else " no-mse")
