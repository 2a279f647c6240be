"""Half precision on the wire."""
from __future__ import annotations

import dataclasses

import torch

from .base import COMPRESSORS, Compressor


@COMPRESSORS.register("fp16")
@dataclasses.dataclass
class FP16(Compressor):
    allreduce = True

    def compress(self, x, ctx):
        return {"x": x.to(torch.float16)}

    def decompress(self, payload, like, ctx):
        return payload["x"].to(like.dtype)
