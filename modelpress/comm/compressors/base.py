"""Gradient compressors. Each is a registered dataclass; `payload` tensors are what goes on the
wire and `nbytes` counts them exactly (per worker, per step).

A compressor whose payloads can be summed in compressed form (`allreduce = True`: no-op, fp16,
Rand-K with a shared seed) is all-reduced; the others (Top-K values+indices, QSGD, sign) are
all-gathered and decompressed on every worker. PowerSGD runs its own two-round protocol.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from ...registry import Registry

COMPRESSORS: Registry = Registry("compressor")


class Compressor:
    registered_name: ClassVar[str]
    allreduce: ClassVar[bool] = False
    level_field: ClassVar[str | None] = None  # the setting L-GreCo varies per layer (k ratio, bits, rank)

    def compress(self, x: torch.Tensor, ctx: dict) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def decompress(self, payload: dict[str, torch.Tensor], like: torch.Tensor, ctx: dict) -> torch.Tensor:
        raise NotImplementedError

    def nbytes(self, payload: dict[str, torch.Tensor]) -> int:
        return sum(t.numel() * t.element_size() for t in payload.values())

    def roundtrip(self, x: torch.Tensor, ctx: dict | None = None) -> torch.Tensor:
        ctx = {} if ctx is None else ctx
        return self.decompress(self.compress(x, ctx), x, ctx)

    def with_level(self, level) -> "Compressor":
        return dataclasses.replace(self, **{self.level_field: level})

    def label(self) -> str:
        fields = ", ".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self))
        return f"{self.registered_name}({fields})"
