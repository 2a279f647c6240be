"""Round-to-nearest quantization, per group, with an optional clipping search."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from ...calib.stats import LinearStats
from ..base import OPERATORS, WeightOperator, check_bits, check_group_size
from ..packed import PackedWeight
from .grid import find_params, n_groups, quantize


@OPERATORS.register("rtn")
@dataclasses.dataclass
class RTN(WeightOperator):
    bits: int = 4
    group_size: int | None = 64
    sym: bool = False
    mse: bool = False  # search a clipping range per group; weighted by ‖X_j‖² when stats are given

    stats: ClassVar[str] = "none"

    def __post_init__(self) -> None:
        check_bits(self.bits)
        check_group_size(self.group_size)

    def compress(self, weight: torch.Tensor, stats: LinearStats | None) -> PackedWeight:
        w = weight.float()
        out_f, in_f = w.shape
        gs = self.group_size or in_f
        ng = n_groups(in_f, self.group_size)
        codes = torch.empty(out_f, in_f, dtype=torch.uint8, device=w.device)
        scales = torch.empty(out_f, ng, dtype=torch.float32, device=w.device)
        zeros = torch.empty(out_f, ng, dtype=torch.float32, device=w.device)
        colw = stats.sqnorm if (stats is not None and stats.sqnorm is not None) else None
        for g in range(ng):
            sl = slice(g * gs, min((g + 1) * gs, in_f))
            s, z = find_params(w[:, sl], self.bits, self.sym, mse=self.mse,
                               col_weight=None if colw is None else colw[sl])
            codes[:, sl] = quantize(w[:, sl], s, z, self.bits).to(torch.uint8)
            scales[:, g:g + 1], zeros[:, g:g + 1] = s, z
        return PackedWeight(shape=(out_f, in_f), bits=self.bits, group_size=self.group_size, sym=self.sym,
                            codes=codes.reshape(-1), scales=scales.to(torch.float16),
                            zeros=None if self.sym else zeros.to(torch.uint8))

    def label(self) -> str:
        return f"rtn w{self.bits}" + (f" g{self.group_size}" if self.group_size else "") + (" mse" if self.mse else "")
