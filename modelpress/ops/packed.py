"""The stored form of one compressed weight matrix, and its exact size.

A `PackedWeight` holds any combination of
- a sparsity mask (1 bit per weight, kept = True),
- integer codes (b bits per kept weight) with per-group float16 scales and b-bit zero points,
  and optionally the column order used to form the groups (act-order),
- or, when not quantized, the kept values in float16,
- plus, optionally, a low-rank correction B·A in float16 added on top.
`dequantize()` is the single definition of the weight it represents: the in-memory compressed
model and a model reloaded from disk both call it, so their logits are identical.
"""
from __future__ import annotations

import dataclasses

import torch

from .packing import pack_bits, pack_mask, packed_nbytes, unpack_bits, unpack_mask
from .quant.grid import n_groups


@dataclasses.dataclass
class PackedWeight:
    shape: tuple[int, int]  # (out_features, in_features)
    mask: torch.Tensor | None = None  # bool (out, in), True = kept
    bits: int | None = None
    group_size: int | None = None  # None: one group per row
    sym: bool = False
    codes: torch.Tensor | None = None  # uint8, kept entries in row-major order
    scales: torch.Tensor | None = None  # float16 (out, n_groups)
    zeros: torch.Tensor | None = None  # uint8 (out, n_groups), asymmetric only
    perm: torch.Tensor | None = None  # int64 (in,): the column order groups were formed in
    values: torch.Tensor | None = None  # float16 kept entries, when not quantized
    lr_b: torch.Tensor | None = None  # float16 (out, r) low-rank correction B
    lr_a: torch.Tensor | None = None  # float16 (r, in) low-rank correction A

    # ---- what it represents -------------------------------------------------------------
    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def n_kept(self) -> int:
        return self.numel if self.mask is None else int(self.mask.sum())

    @property
    def sparsity(self) -> float:
        return 1.0 - self.n_kept / self.numel

    def group_index(self) -> torch.Tensor:
        in_f = self.shape[1]
        gs = self.group_size or in_f
        dev = self.scales.device
        if self.perm is None:
            return torch.arange(in_f, device=dev) // gs
        inv = torch.empty_like(self.perm)
        inv[self.perm] = torch.arange(in_f, device=self.perm.device)
        return (inv // gs).to(dev)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        out_f, in_f = self.shape
        if self.bits is not None:
            if self.mask is None:
                q = self.codes.reshape(out_f, in_f)
            else:
                q = torch.zeros(out_f, in_f, dtype=torch.uint8, device=self.codes.device)
                q[self.mask] = self.codes
            g = self.group_index()
            s = self.scales.float()[:, g]
            z = self.zeros.float()[:, g] if self.zeros is not None else float(1 << (self.bits - 1))
            w = (q.float() - z) * s
            if self.mask is not None:
                w = w.masked_fill(~self.mask, 0.0)
        elif self.values is None:  # no base: a pure low-rank weight, or a removed layer
            w = torch.zeros(out_f, in_f, dtype=torch.float32,
                            device=self.lr_b.device if self.lr_b is not None else "cpu")
        elif self.mask is None:
            w = self.values.float().reshape(out_f, in_f).clone()
        else:
            w = torch.zeros(out_f, in_f, dtype=torch.float32, device=self.values.device)
            w[self.mask] = self.values.float()
        if self.lr_b is not None:
            w = w + self.lr_b.float() @ self.lr_a.float()
        return w.to(dtype)

    # ---- storage ----------------------------------------------------------------------
    def _perm_dtype(self) -> torch.dtype:
        return torch.int16 if self.shape[1] <= 32767 else torch.int32

    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Packed tensors (suffix -> tensor) and JSON metadata."""
        t: dict[str, torch.Tensor] = {}
        meta: dict = {"shape": list(self.shape), "bits": self.bits, "group_size": self.group_size, "sym": self.sym}
        if self.mask is not None:
            t["mask"] = pack_mask(self.mask.cpu())
            meta["n_kept"] = self.n_kept
        if self.bits is not None:
            t["codes"] = pack_bits(self.codes.cpu(), self.bits)
            t["scales"] = self.scales.cpu().to(torch.float16).contiguous()
            if self.zeros is not None:
                t["zeros"] = pack_bits(self.zeros.cpu(), self.bits)
            if self.perm is not None:
                t["perm"] = self.perm.cpu().to(self._perm_dtype())
        elif self.values is not None:
            t["values"] = self.values.cpu().to(torch.float16).reshape(-1).contiguous()
        if self.lr_b is not None:
            t["lr_b"] = self.lr_b.cpu().to(torch.float16).contiguous()
            t["lr_a"] = self.lr_a.cpu().to(torch.float16).contiguous()
            meta["rank"] = int(self.lr_b.shape[1])
        return t, meta

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], meta: dict, device: torch.device | str = "cpu") -> "PackedWeight":
        out_f, in_f = meta["shape"]
        bits = meta["bits"]
        mask = unpack_mask(t["mask"], (out_f, in_f)) if "mask" in t else None
        n_kept = out_f * in_f if mask is None else int(meta["n_kept"])
        if mask is not None and int(mask.sum()) != n_kept:
            raise ValueError("mask does not match its recorded number of kept weights")
        pw = cls(shape=(out_f, in_f), mask=mask, bits=bits, group_size=meta["group_size"], sym=meta["sym"])
        if bits is not None:
            ng = n_groups(in_f, meta["group_size"])
            pw.codes = unpack_bits(t["codes"], bits, n_kept)
            pw.scales = t["scales"].reshape(out_f, ng)
            if "zeros" in t:
                pw.zeros = unpack_bits(t["zeros"], bits, out_f * ng).reshape(out_f, ng)
            if "perm" in t:
                pw.perm = t["perm"].long()
        else:
            pw.values = t.get("values")
        if "lr_b" in t:
            pw.lr_b, pw.lr_a = t["lr_b"], t["lr_a"]
        return pw.to(device)

    def to(self, device) -> "PackedWeight":
        f = {k.name: getattr(self, k.name) for k in dataclasses.fields(self)}
        for k, v in f.items():
            if torch.is_tensor(v):
                f[k] = v.to(device)
        return PackedWeight(**f)

    def nbytes(self) -> int:
        """Exact bytes of the packed tensors (what `to_tensors` writes, before file headers)."""
        out_f, in_f = self.shape
        n = 0
        if self.mask is not None:
            n += packed_nbytes(self.numel, 1)
        if self.bits is not None:
            ng = n_groups(in_f, self.group_size)
            n += packed_nbytes(self.n_kept, self.bits) + out_f * ng * 2
            if self.zeros is not None:
                n += packed_nbytes(out_f * ng, self.bits)
            if self.perm is not None:
                n += in_f * (2 if self._perm_dtype() == torch.int16 else 4)
        elif self.values is not None:
            n += self.n_kept * 2
        if self.lr_b is not None:
            n += (self.lr_b.numel() + self.lr_a.numel()) * 2
        return n

    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes() / self.numel

    def describe(self) -> str:
        parts = []
        if self.bits is not None:
            parts.append(f"int{self.bits}" + (f" g{self.group_size}" if self.group_size else ""))
        if self.mask is not None:
            parts.append(f"{100 * self.sparsity:.0f}% sparse")
        if self.lr_b is not None:
            parts.append(f"{'+' if parts or self.values is not None else ''}rank{self.lr_b.shape[1]}")
        if self.bits is None and self.values is None and self.lr_b is None:
            return "removed"
        return " ".join(parts) or "fp16"


def dense_packed(w: torch.Tensor) -> PackedWeight:
    """An uncompressed (float16) weight in packed form."""
    return PackedWeight(shape=tuple(w.shape), values=w.to(torch.float16).reshape(-1))


def load_weight(t: dict[str, torch.Tensor], meta: dict, device: torch.device | str = "cpu"):
    """A stored weight of any format: packed (default) or raw GGML blocks."""
    if meta.get("format") == "ggml":
        from .ggmlweight import GGMLWeight

        return GGMLWeight.from_tensors(t, meta, device)
    return PackedWeight.from_tensors(t, meta, device)
