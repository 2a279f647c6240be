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
