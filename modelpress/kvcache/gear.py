"""GEAR: low-bit quantization of the cache, a low-rank approximation of the quantization residual,
and a sparse set of outlier entries kept exactly (Kang et al., 2024). Chunks of `group` tokens are
compressed per head (KIVI grouping for the quantization); the most recent `window` tokens stay in
full precision."""
from __future__ import annotations

import dataclasses
import math

import torch

from ..errors import ConfigError
from .base import KV_METHODS, KVMethod
from .quant import QuantStore, quant_keys, quant_values


def _split(x: torch.Tensor, n: int, g: int) -> torch.Tensor:
    h, _, d = x.shape
    return x.reshape(h, n, g, d)


class GEARStore(QuantStore):
    def __init__(self, *a):
        super().__init__(*a)
        self.extra = {"k": None, "v": None}  # dicts of stacked (H, C, ...) tensors

    def head_bits(self, device):
        if self.bits is None:
            self.bits = torch.full((self.n_heads,), self.method.bits, device=device)
        return self.bits

    def _outliers(self, x: torch.Tensor, per_channel: bool):
        """x (H, C, G, D) -> (idx (H, C, k) int16, vals fp16, x without them). The k entries kept
        exactly are those farthest from their own quantization group, in units of its spread: per
        channel over the chunk's tokens for keys, per token over its channels for values."""
        h, c, g, d = x.shape
        k = int(math.ceil(self.method.outliers * g * d)) if self.method.outliers > 0 else 0
        x = x.float()
        if not k:
            return None, None, x
        dim = 2 if per_channel else 3
        mean = x.mean(dim, keepdim=True)
        z = (x - mean).abs() / x.std(dim, keepdim=True).clamp_min(1e-6)
        idx = torch.topk(z.reshape(h, c, g * d), k, dim=-1).indices
        flat = x.reshape(h, c, g * d)
        vals = flat.gather(-1, idx)
        # the removed entries take their group's mean, which stays inside the group's range (a zero
        # could widen it); decoding overwrites them with the exact values anyway
        fill = mean.expand_as(x).reshape(h, c, g * d).gather(-1, idx)
        flat = flat.scatter(-1, idx, fill)
        return idx.to(torch.int16), vals.half(), flat.reshape(h, c, g, d)

    def _lowrank(self, r: torch.Tensor):
        rank = self.method.rank
        if not rank:
            return None, None
        h, c, g, d = r.shape
        u, s, vh = torch.linalg.svd(r.reshape(h * c, g, d), full_matrices=False)
        rr = min(rank, s.shape[-1])
        b = (u[..., :rr] * s[:, None, :rr]).half().reshape(h, c, g, rr)
        a = vh[:, :rr].half().reshape(h, c, rr, d)
        return b, a

    def compact(self):
        g, take = self.method.group, self.ready()
        if not take:
            return
        c = take // g
        h, d = self.rk.shape[0], self.rk.shape[2]
        bits = self.head_bits(self.rk.device)
        parts = {}
        for name, x in (("k", self.rk[:, :take]), ("v", self.rv[:, :take])):
            idx, vals, xs = self._outliers(_split(x, c, g), per_channel=name == "k")
            if name == "k":
                codes, scale, zero = quant_keys(xs.permute(1, 0, 2, 3).reshape(c * h, g, d), bits.repeat(c))
                codes = codes.reshape(c, h, g, d).permute(1, 0, 2, 3)
                scale = scale.reshape(c, h, 1, d).permute(1, 0, 2, 3)
                zero = zero.reshape(c, h, 1, d).permute(1, 0, 2, 3)
                deq = codes.float() * scale.float() + zero.float()
                parts["k"] = (codes.reshape(h, take, d), scale.reshape(h, c, d), zero.reshape(h, c, d))
            else:
                gv = self.value_group()
                codes, scale, zero = quant_values(xs.reshape(h, take, d), self.value_bits(xs.device), gv)
                deq = (codes.reshape(h, take, d // gv, gv).float() * scale.float()[..., None]
                       + zero.float()[..., None]).reshape(h, c, g, d)
                parts["v"] = (codes, scale, zero)
            b, a = self._lowrank(xs - deq)
            new = {"idx": idx, "vals": vals, "b": b, "a": a}
            old = self.extra[name]
            self.extra[name] = new if old is None else {
                key: None if t is None else torch.cat([old[key], t], 1) for key, t in new.items()}
        self._push(("kc", "ks", "kz", "vc", "vs", "vz"), *parts["k"], *parts["v"])
        self.retire(take)

    def decode(self):
        k, v = super().decode()
        out = []
        g = self.method.group
        for name, x in (("k", k), ("v", v)):
            e = self.extra[name]
            h, t, d = x.shape
            x = x.reshape(h, t // g, g, d)
            if e["b"] is not None:
                x = x + e["b"].float() @ e["a"].float()
            if e["idx"] is not None:
                flat = x.reshape(h, t // g, g * d)
                flat = flat.scatter(-1, e["idx"].long(), e["vals"].float())
                x = flat.reshape(h, t // g, g, d)
            out.append(x.reshape(h, t, d))
        return out[0], out[1]

    def nbytes(self):
        n = super().nbytes()
        for e in self.extra.values():
            if e is None:
                continue
            for key in ("idx", "vals", "b", "a"):
                if e[key] is not None:
                    n += e[key].numel() * 2
        return n


@KV_METHODS.register("gear")
@dataclasses.dataclass
class GEAR(KVMethod):
    bits: int = 2
    group: int = 32
    window: int = 32
    rank: int = 2  # rank of the residual approximation per head and chunk
    outliers: float = 0.01  # fraction of entries kept exactly
    value_bits: int | None = None  # values at their own bit-width (default: `bits`)
    value_group: int | None = None  # channels per value scale (default: `group`); divides head_dim

    store = GEARStore

    def __post_init__(self):
        if self.bits not in (2, 3, 4, 8) or self.value_bits not in (None, 2, 3, 4, 8):
            raise ConfigError("GEAR bits (and value_bits) must be 2, 3, 4 or 8")
        if not 0 <= self.outliers < 0.5 or self.rank < 0:
            raise ConfigError("GEAR needs 0 <= outliers < 0.5 and rank >= 0")
