"""Top-K: the k largest-magnitude entries, sent as values (float32) and indices (int32)."""
from __future__ import annotations

import dataclasses
import math

import torch

from ...errors import ConfigError
from .base import COMPRESSORS, Compressor


@COMPRESSORS.register("topk")
@dataclasses.dataclass
class TopK(Compressor):
    ratio: float = 0.01

    level_field = "ratio"

    def __post_init__(self):
        if not 0 < self.ratio <= 1:
            raise ConfigError("topk ratio must be in (0, 1]")

    def k(self, n: int) -> int:
        return max(1, min(n, int(math.ceil(self.ratio * n))))

    def compress(self, x, ctx):
        flat = x.reshape(-1)
        idx = torch.topk(flat.abs(), self.k(flat.numel()), sorted=False).indices
        return {"values": flat[idx], "indices": idx.to(torch.int32)}

    def decompress(self, payload, like, ctx):
        out = torch.zeros(like.numel(), dtype=like.dtype, device=like.device)
        out.index_add_(0, payload["indices"].long(), payload["values"].to(like.dtype))
        return out.reshape(like.shape)
