"""KIVI-style quantized cache: keys per channel (statistics over groups of `group` tokens), values
per token (statistics over groups of `group` channels), the most recent `window` tokens kept in full
precision. Bit-widths may differ per layer and KV head (`head_bits`): that is what the budget
allocators choose. All chunks of a row live in concatenated code/scale tensors, decoded in one step."""
from __future__ import annotations

import dataclasses

import torch

from ..errors import ConfigError
from .base import KV_METHODS, KVMethod, RowStore


def _mq(bits: torch.Tensor) -> torch.Tensor:
    return (2 ** bits.float()) - 1


def quant_keys(k: torch.Tensor, bits: torch.Tensor):
    """k (H, G, D): one (scale, zero) per head and channel over the G tokens. bits (H,)."""
    mq = _mq(bits)[:, None, None]
    lo, hi = k.amin(1, keepdim=True), k.amax(1, keepdim=True)
    scale = ((hi - lo) / mq).clamp_min(1e-8).half()
    zero = lo.half()
    codes = torch.round((k.float() - zero.float()) / scale.float()).clamp_min(0).minimum(mq).to(torch.uint8)
    return codes, scale, zero  # (H, G, D) (H, 1, D) (H, 1, D)


def quant_values(v: torch.Tensor, bits: torch.Tensor, group: int):
    """v (H, G, D): one (scale, zero) per head, token and group of `group` channels."""
    h, g, d = v.shape
    gv = min(group, d)
    if d % gv:
        raise ConfigError(f"values are quantized in groups of channels: the value group ({gv}) must divide "
                          f"head_dim={d}; set value_group")
    x = v.float().reshape(h, g, d // gv, gv)
    mq = _mq(bits)[:, None, None, None]
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    scale = ((hi - lo) / mq).clamp_min(1e-8).half()
    zero = lo.half()
    codes = torch.round((x - zero.float()) / scale.float()).clamp_min(0).minimum(mq).to(torch.uint8)
    return codes.reshape(h, g, d), scale[..., 0], zero[..., 0]  # (H, G, D) (H, G, D/gv) x2


class GroupedStore(RowStore):
    """Recent tokens kept exact in a residual (rk, rv, rpos); older ones encoded `group` tokens at a
    time (positions qpos). Subclasses encode in compact() and decode in decode(); the residual and
    position bookkeeping lives here."""

    def __init__(self, method, layer, n_heads, head_dim, dtype):
        super().__init__(method, layer, n_heads, head_dim, dtype)
        self.rk = self.rv = self.rpos = None
        self.qpos = None  # (T,) positions of the encoded tokens

    def append(self, k, v, pos):
        k, v = self.keep(k), self.keep(v)
        if self.rk is None:
            self.rk, self.rv, self.rpos = k, v, pos
        else:
            self.rk, self.rv = torch.cat([self.rk, k], 1), torch.cat([self.rv, v], 1)
            self.rpos = torch.cat([self.rpos, pos])

    def ready(self) -> int:
        """Residual tokens ready to encode: whole groups beyond the exact recent window."""
        n = 0 if self.rk is None else self.rk.shape[1]
        return max(0, (n - self.method.window) // self.method.group) * self.method.group

    def retire(self, take: int) -> None:
        """The first `take` residual tokens have been encoded: move their positions, drop them."""
        self.qpos = self.rpos[:take] if self.qpos is None else torch.cat([self.qpos, self.rpos[:take]])
        self.rk, self.rv, self.rpos = self.rk[:, take:], self.rv[:, take:], self.rpos[take:]

    def decode(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def residual_bytes(self) -> int:
        """Bytes of the not-yet-encoded tokens, held in the storage dtype."""
        return 0 if self.rk is None else (self.rk.numel() + self.rv.numel()) * self.rk.element_size()

    def materialize(self):
        ks, vs, ps = [], [], []
        if self.qpos is not None:
            k, v = self.decode()
            ks.append(self.give(k))
            vs.append(self.give(v))
            ps.append(self.qpos)
        if self.rk is not None:
            ks.append(self.give(self.rk))
            vs.append(self.give(self.rv))
            ps.append(self.rpos)
        return torch.cat(ks, 1), torch.cat(vs, 1), torch.cat(ps).expand(self.n_heads, -1)


class QuantStore(GroupedStore):
    """Residual of recent tokens in full precision; older tokens quantized `group` at a time."""

    def __init__(self, method, layer, n_heads, head_dim, dtype):
        super().__init__(method, layer, n_heads, head_dim, dtype)
        self.kc = self.ks = self.kz = None  # (H, T, D) uint8, (H, C, D) fp16 x2
        self.vc = self.vs = self.vz = None  # (H, T, D) uint8, (H, T, D/gv) fp16 x2
        self.bits = None

    def head_bits(self, device) -> torch.Tensor:
        if self.bits is None:
            self.bits = torch.tensor(self.method.bits_of(self.layer)[: self.n_heads], device=device)
        return self.bits

    def value_bits(self, device) -> torch.Tensor:
        """Bits of the values: the method's `value_bits` if set, else the keys' bits."""
        vb = self.method.value_bits
        return self.head_bits(device) if vb is None else torch.full((self.n_heads,), vb, device=device)

    def value_group(self) -> int:
        """Channels per value scale: the method's `value_group` if set, else `group`, at most head_dim."""
        return min(self.method.value_group or self.method.group, self.head_dim)

    def _push(self, name, *ts):
        cur = [getattr(self, n) for n in name]
        new = [t if c is None else torch.cat([c, t], 1) for c, t in zip(cur, ts)]
        for n, t in zip(name, new):
            setattr(self, n, t)

    def compact(self):
        g, take = self.method.group, self.ready()
        if not take:
            return
        n_chunks = take // g
        k, v = self.rk[:, :take], self.rv[:, :take]
        h, d = k.shape[0], k.shape[2]
        bits = self.head_bits(k.device)
        chunks = k.reshape(h, n_chunks, g, d).permute(1, 0, 2, 3).reshape(n_chunks * h, g, d)
        kc, ks, kz = quant_keys(chunks, bits.repeat(n_chunks))
        kc = kc.reshape(n_chunks, h, g, d).permute(1, 0, 2, 3).reshape(h, take, d)
        ks = ks.reshape(n_chunks, h, 1, d).permute(1, 0, 2, 3).reshape(h, n_chunks, d)
        kz = kz.reshape(n_chunks, h, 1, d).permute(1, 0, 2, 3).reshape(h, n_chunks, d)
        vc, vs, vz = quant_values(v, self.value_bits(v.device), self.value_group())
        self._push(("kc", "ks", "kz", "vc", "vs", "vz"), kc, ks, kz, vc, vs, vz)
        self.retire(take)

    def decode(self) -> tuple[torch.Tensor, torch.Tensor]:
        h, t, d = self.kc.shape
        g = self.method.group
        c = t // g
        k = self.kc.reshape(h, c, g, d).float() * self.ks.float()[:, :, None] + self.kz.float()[:, :, None]
        gv = self.value_group()
        v = self.vc.reshape(h, t, d // gv, gv).float() * self.vs.float()[..., None] + self.vz.float()[..., None]
        return k.reshape(h, t, d), v.reshape(h, t, d)

    def code_bytes(self) -> int:
        if self.kc is None:
            return 0
        t, d = self.kc.shape[1], self.kc.shape[2]
        vbits = self.value_bits(self.kc.device).tolist()
        return sum(-(-t * d * int(kb) // 8) + -(-t * d * int(vb) // 8)  # keys + values, packed
                   for kb, vb in zip(self.bits.tolist(), vbits))

    def nbytes(self):
        n = self.code_bytes()
        if self.kc is not None:
            n += 2 * (self.ks.numel() + self.kz.numel() + self.vs.numel() + self.vz.numel())
        return n + self.residual_bytes()


class HalfStore(QuantStore):
    """16 bits: the quantized part is plain float16."""

    def compact(self):
        take = self.ready()
        if not take:
            return
        self._push(("kc", "vc"), self.rk[:, :take].half(), self.rv[:, :take].half())
        self.retire(take)

    def decode(self):
        return self.kc.float(), self.vc.float()

    def nbytes(self):
        n = 0 if self.kc is None else 2 * (self.kc.numel() + self.vc.numel())
        return n + self.residual_bytes()


class KIVIStore(RowStore):
    """Dispatches to the float16 store when every head of the layer is at 16 bits."""

    def __new__(cls, method, layer, n_heads, head_dim, dtype):
        bits = method.bits_of(layer)[:n_heads]
        impl = HalfStore if all(b >= 16 for b in bits) else QuantStore
        if any(b >= 16 for b in bits) and impl is QuantStore:
            raise ConfigError("mixing 16-bit and quantized heads in one layer is not supported")
        return impl(method, layer, n_heads, head_dim, dtype)


@KV_METHODS.register("kivi")
@dataclasses.dataclass
class KIVI(KVMethod):
    bits: int = 4  # 2, 3, 4, 8; 16 = float16, no quantization
    group: int = 32
    window: int = 32
    head_bits: list | None = None  # [layer][kv head] bit-widths (overrides `bits`)
    value_bits: int | None = None  # values at their own bit-width (keys are the more sensitive half)
    value_group: int | None = None  # channels per value scale (default: `group`); divides head_dim

    store = KIVIStore

    def __post_init__(self):
        all_bits = [self.bits] + [x for row in (self.head_bits or []) for x in row]
        for b in all_bits:
            if b not in (2, 3, 4, 8, 16):
                raise ConfigError(f"KV bits must be 2, 3, 4, 8 or 16, got {b}")
        if self.value_bits is not None and self.value_bits not in (2, 3, 4, 8):
            raise ConfigError(f"KV value bits must be 2, 3, 4 or 8, got {self.value_bits}")
        if self.value_bits is not None and 16 in all_bits:
            raise ConfigError("value_bits needs quantized keys (bits 2, 3, 4 or 8)")
        if self.group < 1 or self.window < 0 or (self.value_group is not None and self.value_group < 1):
            raise ConfigError("group >= 1, value_group >= 1 and window >= 0")

    def bits_of(self, layer: int) -> list[int]:
        if self.head_bits is not None:
            return list(self.head_bits[layer])
        return [self.bits] * 1024
