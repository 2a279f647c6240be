"""Rand-K: k random entries scaled by n/k (unbiased). Every worker draws the same indices from a
seed shared through the step counter, so only the values travel and they can be all-reduced."""
from __future__ import annotations

import dataclasses
import math

import torch

from ...errors import ConfigError
from .base import COMPRESSORS, Compressor


@COMPRESSORS.register("randk")
@dataclasses.dataclass
class RandK(Compressor):
    ratio: float = 0.01
    seed: int = 0

    allreduce = True
    level_field = "ratio"

    def __post_init__(self):
        if not 0 < self.ratio <= 1:
            raise ConfigError("randk ratio must be in (0, 1]")

    def _indices(self, n: int, ctx: dict, device) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + ctx.get("step", 0) * 7919 + ctx.get("key", 0))
        k = max(1, min(n, int(math.ceil(self.ratio * n))))
        return torch.randperm(n, generator=g)[:k].to(device)

    def compress(self, x, ctx):
        flat = x.reshape(-1)
        idx = self._indices(flat.numel(), ctx, x.device)
        return {"values": flat[idx] * (flat.numel() / idx.numel())}

    def decompress(self, payload, like, ctx):
        idx = self._indices(like.numel(), ctx, like.device)
        out = torch.zeros(like.numel(), dtype=like.dtype, device=like.device)
        out[idx] = payload["values"].to(like.dtype)
        return out.reshape(like.shape)
