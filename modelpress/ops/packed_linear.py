"""A Linear whose weight stays in its stored form: the packed runtime of `load_compressed`.

The module keeps the checkpoint's tensors (bit-packed codes, float16 scales, packed zero points,
masks, low-rank factors, or GGML blocks) as buffers, so its resident memory is the checkpoint's;
each forward decodes the weight (the same `dequantize()` every other path uses, so the logits are
identical to the dequantized model's) into a temporary in the activations' dtype, multiplies, and
drops it. Peak extra memory: one layer's dense weight.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .packed import load_weight


class PackedLinear(nn.Module):
    def __init__(self, tensors: dict[str, torch.Tensor], meta: dict, bias: torch.Tensor | None = None):
        super().__init__()
        self.meta = meta
        self.in_features, self.out_features = int(meta["shape"][1]), int(meta["shape"][0])
        self._names = sorted(tensors)
        for k in self._names:
            self.register_buffer(f"packed_{k}", tensors[k].contiguous())
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    def packed(self):
        """The stored weight as a PackedWeight (or GGMLWeight), on this module's device."""
        return load_weight({k: getattr(self, f"packed_{k}") for k in self._names}, self.meta,
                           device=getattr(self, f"packed_{self._names[0]}").device if self._names else "cpu")

    @property
    def weight(self) -> torch.Tensor:
        """The decoded weight (float32); a forward decodes it in the activations' dtype instead."""
        return self.packed().dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.packed().dequantize().to(device=x.device, dtype=x.dtype)
        return F.linear(x, w, self.bias.to(x.dtype) if self.bias is not None else None)

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed {self.nbytes()} bytes"


INT4_GROUPS = (32, 64, 128, 256)  # group sizes torch's CPU int4 matmul takes


def int4_eligible(pw) -> bool:
    """Whether torch's CPU int4 weight-only matmul can run this packed weight."""
    from .packed import PackedWeight

    if not isinstance(pw, PackedWeight) or pw.bits != 4 or pw.mask is not None or pw.lr_b is not None:
        return False
    gs = pw.group_size or pw.shape[1]
    return gs in INT4_GROUPS and pw.shape[1] % gs == 0 and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


class Int4Linear(nn.Module):
    """A 4-bit layer on torch's CPU int4 weight-only matmul (`_weight_int4pack_mm_for_cpu`), which
    runs in bfloat16: activations are rounded to bfloat16 on the way in, so its outputs differ from
    the exact decode of PackedLinear by bfloat16 rounding. w = (code − 8)·scale + (8 − zero)·scale is
    modelpress's (code − zero)·scale; act-order groups are contiguous once the inputs are permuted."""

    def __init__(self, pw, bias: torch.Tensor | None = None):
        super().__init__()
        out_f, in_f = pw.shape
        self.in_features, self.out_features = in_f, out_f
        self.group_size = pw.group_size or in_f
        q = pw.codes.reshape(out_f, in_f).to(torch.int32)
        if pw.perm is not None:
            q = q[:, pw.perm]  # sweep order: groups are runs of columns
            self.register_buffer("perm", pw.perm.to(torch.int64))
        else:
            self.perm = None
        self.register_buffer("w_int4", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1))
        s = pw.scales.float()
        z = pw.zeros.float() if pw.zeros is not None else torch.full_like(s, 8.0)
        self.register_buffer("scales_zeros", torch.stack([s, (8.0 - z) * s], dim=-1).transpose(0, 1)
                             .contiguous().to(torch.bfloat16))  # (groups, out, 2)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        h = x.reshape(-1, shape[-1])
        if self.perm is not None:
            h = h.index_select(1, self.perm)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(h.to(torch.bfloat16).contiguous(), self.w_int4,
                                                       self.group_size, self.scales_zeros)
        y = y.to(x.dtype).reshape(*shape[:-1], self.out_features)
        return y + self.bias.to(x.dtype) if self.bias is not None else y

    @property
    def weight(self) -> torch.Tensor:
        """The decoded weight (float32, through the kernel: one matmul with the identity)."""
        eye = torch.eye(self.in_features, dtype=torch.bfloat16)
        w = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.w_int4, self.group_size, self.scales_zeros)
        w = w.float().t()
        if self.perm is not None:
            out = torch.empty_like(w)
            out[:, self.perm] = w
            w = out
        return w

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())
