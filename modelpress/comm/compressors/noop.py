"""No compression: the gradient as is (float32 on the wire)."""
from __future__ import annotations

import dataclasses

from .base import COMPRESSORS, Compressor


@COMPRESSORS.register("none")
@dataclasses.dataclass
class NoOp(Compressor):
    allreduce = True

    def compress(self, x, ctx):
        return {"x": x}

    def decompress(self, payload, like, ctx):
        return payload["x"]
