"""EoRA: training-free low-rank compensation of compression error in the eigenspace of the
calibration activations (Liu et al., 2024).

ΔW = W − Ŵ; XᵀX = QΛQᵀ; SVD of ΔW·QΛ^½ truncated to rank r; project back with Λ^-½Qᵀ. The result
B·A minimises the layer output error ‖(ΔW − BA)X‖ for that rank, whatever produced Ŵ
(quantization, pruning or both).
"""
from __future__ import annotations

import dataclasses

import torch

from ...calib.stats import LinearStats
from ...errors import ConfigError
from ..lowrank.factor import activation_aware
from ..packed import PackedWeight
from .base import COMPENSATORS, Compensator


@COMPENSATORS.register("eora")
@dataclasses.dataclass
class EoRA(Compensator):
    rank: int = 16
    damp: float = 0.01

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ConfigError("EoRA rank must be >= 1")

    def apply(self, weight: torch.Tensor, packed: PackedWeight, stats: LinearStats, roots=None) -> PackedWeight:
        if stats is None or stats.xtx is None:
            raise ConfigError("EoRA needs calibration statistics (XᵀX)")
        base = dataclasses.replace(packed, lr_b=None, lr_a=None)
        delta = weight.float() - base.dequantize().to(weight.device)
        b, a = activation_aware(delta, stats.hessian, min(self.rank, min(weight.shape)), self.damp, roots=roots)
        return dataclasses.replace(base, lr_b=b.to(torch.float16), lr_a=a.to(torch.float16))

    def label(self) -> str:
        return f"+eora r{self.rank}"
