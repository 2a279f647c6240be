"""SparseGPT: prune with OBS weight updates, mask chosen adaptively per block of columns
(Frantar & Alistarh, 2023). Optionally quantizes the kept weights in the same sweep.

`refit_iters` > 0 (unquantized only): after the sweep has fixed the mask, the kept weights are
re-solved for the least output error on that mask (`obs.refit_masked`, Boža 2024's observation that
the sweep's one-pass updates leave error on the table)."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from ...calib.stats import LinearStats
from ...errors import ConfigError
from ..base import OPERATORS, SparsityTarget, WeightOperator, check_bits, check_group_size
from ..obs import obs_sweep, refit_masked, shrink_hessian, to_packed
from ..packed import PackedWeight


@OPERATORS.register("sparsegpt")
@dataclasses.dataclass
class SparseGPT(SparsityTarget, WeightOperator):
    bits: int | None = None  # also quantize the kept weights (joint sparse + quantized)
    group_size: int | None = 64
    sym: bool = False
    damp: float = 0.01
    shrink: float = 0.0  # blend H with its diagonal (obs.shrink_hessian): less fit to the calibration text
    block_size: int = 128
    refit_iters: int = 30  # conjugate-gradient steps refitting the kept weights (0: the plain sweep)

    stats: ClassVar[str] = "xtx"

    def __post_init__(self) -> None:
        self.check()
        if self.bits is not None:
            check_bits(self.bits)
        check_group_size(self.group_size)
        if not 0.0 <= self.shrink <= 1.0:
            raise ConfigError(f"shrink must be in [0, 1], got {self.shrink!r}")
        if not isinstance(self.refit_iters, int) or self.refit_iters < 0:
            raise ConfigError(f"refit_iters must be a non-negative integer, got {self.refit_iters!r}")

    def compress(self, weight: torch.Tensor, stats: LinearStats | None) -> PackedWeight:
        nm = self.nm()
        h = shrink_hessian(stats.hessian, self.shrink)
        res = obs_sweep(weight, h, bits=self.bits, group_size=self.group_size, sym=self.sym,
                        n_prune=None if nm else self.count(weight.numel()), nm=nm,
                        damp=self.damp, block_size=self.block_size)
        if self.refit_iters and self.bits is None and res.mask is not None:
            res.weight = refit_masked(weight, h, res.mask, res.weight, damp=self.damp,
                                      iters=self.refit_iters)
        return to_packed(res, self.bits, self.group_size, self.sym)

    def label(self) -> str:
        q = f" w{self.bits}" if self.bits else ""
        return f"sparsegpt {SparsityTarget.label(self)}{q}"
