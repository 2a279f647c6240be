"""1-bit: the signs, packed, and one float32 scale (mean |x|), so scale · sign(x) keeps the l1 norm."""
from __future__ import annotations

import dataclasses


from ...ops.packing import pack_mask, unpack_mask
from .base import COMPRESSORS, Compressor


@COMPRESSORS.register("sign")
@dataclasses.dataclass
class Sign(Compressor):
    def compress(self, x, ctx):
        flat = x.reshape(-1)
        return {"scale": flat.abs().mean().reshape(1).float(), "signs": pack_mask((flat >= 0).cpu()).to(x.device)}

    def decompress(self, payload, like, ctx):
        pos = unpack_mask(payload["signs"].cpu(), (like.numel(),)).to(like.device)
        return (payload["scale"].to(like.dtype) * (pos.to(like.dtype) * 2 - 1)).reshape(like.shape)
