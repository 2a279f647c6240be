"""A weight stored as raw GGML blocks (Q4_K, Q8_0, ...), in GGUF row order.

Llama q/k projections are stored by GGUF with the rotary halves interleaved (llama.cpp's layout);
`heads` records that permutation so `dequantize()` returns the Hugging Face layout. The bytes are
exactly the tensor data of the exported GGUF file.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch


def to_gguf_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Hugging Face q/k rows -> GGUF (llama.cpp) rows."""
    out_f = w.shape[0]
    return w.reshape(heads, 2, out_f // heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def from_gguf_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    out_f = w.shape[0]
    return w.reshape(heads, out_f // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


@dataclasses.dataclass
class GGMLWeight:
    shape: tuple[int, int]  # (out, in) in Hugging Face layout
    type: str  # GGML type name
    data: torch.Tensor  # uint8 (rows, bytes per row), GGUF row order
    heads: int | None = None  # q/k head count for the rotary row permutation
    # the importance matrix it was quantized with (mean x² per input column), kept so llama.cpp's
    # own quantizer can rebuild it (export.ggufio.write_llama_quantize_recipe)
    importance: torch.Tensor | None = None
    chosen_by: str = "ggml"  # who chose the codes: ggml's quantizer, or "gptq" (ops/quant/gptq_ggml.py)

    @classmethod
    def quantize(cls, w: torch.Tensor, type_name: str, heads: int | None = None,
                 imatrix: torch.Tensor | None = None) -> "GGMLWeight":
        from . import ggml

        rows = to_gguf_rows(w.float(), heads) if heads else w.float()
        im = None if imatrix is None else imatrix.detach().float().cpu()  # per input column: rows permute only
        data = ggml.quantize(rows.detach().cpu().numpy(), ggml.qtype(type_name), None if im is None else im.numpy())
        return cls(shape=tuple(w.shape), type=type_name, data=torch.from_numpy(data), heads=heads, importance=im)

    def gguf_rows(self) -> torch.Tensor:
        """The decoded weight in GGUF row order."""
        from . import ggml

        w = ggml.dequantize(self.data.cpu().numpy(), ggml.qtype(self.type), self.shape)
        return torch.from_numpy(np.ascontiguousarray(w))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        w = self.gguf_rows()
        return (from_gguf_rows(w, self.heads) if self.heads else w).to(dtype)

    def nbytes(self) -> int:
        return int(self.data.numel())

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes() / self.numel

    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict]:
        t = {"data": self.data.contiguous()}
        if self.importance is not None:
            t["importance"] = self.importance.contiguous()
        meta = {"format": "ggml", "shape": list(self.shape), "type": self.type, "heads": self.heads}
        if self.chosen_by != "ggml":
            meta["chosen_by"] = self.chosen_by
        return t, meta

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], meta: dict, device="cpu") -> "GGMLWeight":
        return cls(shape=tuple(meta["shape"]), type=meta["type"], data=t["data"], heads=meta.get("heads"),
                   importance=t.get("importance"), chosen_by=meta.get("chosen_by", "ggml"))

    def to(self, device) -> "GGMLWeight":
        return self

    def describe(self) -> str:
        return self.type
