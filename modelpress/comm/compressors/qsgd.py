"""QSGD: each entry becomes ‖x‖ · sign · ξ/s with ξ a stochastic rounding of s·|x|/‖x‖ to an integer
in 0..s (unbiased). `bits` per entry carry sign and level (s = 2^(bits-1) - 1), plus one float32 norm."""
from __future__ import annotations

import dataclasses

import torch

from ...errors import ConfigError
from ...ops.packing import pack_bits, unpack_bits
from .base import COMPRESSORS, Compressor


@COMPRESSORS.register("qsgd")
@dataclasses.dataclass
class QSGD(Compressor):
    bits: int = 4
    seed: int = 0

    level_field = "bits"

    def __post_init__(self):
        if not 2 <= self.bits <= 8:
            raise ConfigError("qsgd bits must be in 2..8")

    @property
    def s(self) -> int:
        return (1 << (self.bits - 1)) - 1

    def compress(self, x, ctx):
        flat = x.reshape(-1).float()
        norm = flat.norm()
        if norm == 0:
            return {"norm": norm.reshape(1), "codes": pack_bits(torch.zeros(flat.numel(), dtype=torch.uint8, device=flat.device), self.bits)}
        g = ctx.setdefault("rng", torch.Generator(device="cpu").manual_seed(self.seed + 31 * ctx.get("key", 0)))
        level = flat.abs() / norm * self.s
        low = level.floor()
        xi = low + (torch.rand(flat.numel(), generator=g).to(flat.device) < (level - low)).float()
        codes = xi.to(torch.uint8)  # level 0..s
        signs = (flat < 0).to(torch.uint8) << (self.bits - 1)
        return {"norm": norm.reshape(1), "codes": pack_bits((codes | signs).cpu(), self.bits).to(x.device)}

    def decompress(self, payload, like, ctx):
        v = unpack_bits(payload["codes"].cpu(), self.bits, like.numel()).to(like.device)
        level = (v & ((1 << (self.bits - 1)) - 1)).float()
        sign = 1 - 2 * ((v >> (self.bits - 1)) & 1).float()
        return (payload["norm"].float() * sign * level / self.s).reshape(like.shape).to(like.dtype)
