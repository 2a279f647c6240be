"""What every weight operator shares: the registry, the interface and sparsity-target helpers."""
from __future__ import annotations

import dataclasses
import re
from typing import ClassVar

import torch

from ..calib.stats import LinearStats
from ..errors import ConfigError
from ..registry import Registry
from .packed import PackedWeight

OPERATORS: Registry = Registry("operator")


class WeightOperator:
    """Base of registered operator dataclasses: `compress(weight, stats) -> PackedWeight`.

    `stats` says which calibration statistics the operator needs: "none", "norms" (‖X_j‖) or
    "xtx" (XᵀX). The weight is (out_features, in_features), float32, on the compute device.
    """

    stats: ClassVar[str] = "none"
    registered_name: ClassVar[str]

    def compress(self, weight: torch.Tensor, stats: LinearStats | None) -> PackedWeight:  # pragma: no cover
        raise NotImplementedError

    def label(self) -> str:
        return self.registered_name


def check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ConfigError(f"bits must be an integer from 2 to 8, got {bits!r}")


def check_group_size(group_size: int | None) -> None:
    if group_size is not None and (not isinstance(group_size, int) or group_size < 1):
        raise ConfigError(f"group size must be a positive integer or None, got {group_size!r}")


def parse_pattern(pattern: str | None) -> tuple[int, int] | None:
    """'2:4' -> (2, 4): keep n of every m consecutive input weights."""
    if pattern is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(pattern))
    if not m or not 0 < int(m.group(1)) < int(m.group(2)):
        raise ConfigError(f"pattern must look like N:M with 0 < N < M (e.g. 2:4), got {pattern!r}")
    return int(m.group(1)), int(m.group(2))


@dataclasses.dataclass
class SparsityTarget:
    """Exactly one of: a fraction, an N:M pattern, or an exact number of weights to prune."""

    sparsity: float | None = None
    pattern: str | None = None
    n_prune: int | None = None

    def check(self) -> None:
        given = [x is not None for x in (self.sparsity, self.pattern, self.n_prune)]
        if sum(given) != 1:
            raise ConfigError("give exactly one of sparsity (0..0.95), pattern (N:M) or n_prune")
        if self.sparsity is not None and not 0.0 <= self.sparsity <= 0.95:
            raise ConfigError(f"sparsity must be between 0 and 0.95, got {self.sparsity}")
        parse_pattern(self.pattern)

    def nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern)

    def count(self, numel: int) -> int:
        """Weights to prune in a matrix of `numel` (unstructured targets)."""
        if self.n_prune is not None:
            if not 0 <= self.n_prune <= numel:
                raise ConfigError(f"n_prune={self.n_prune} is outside 0..{numel}")
            return int(self.n_prune)
        return int(round(self.sparsity * numel))

    def label(self) -> str:
        if self.pattern:
            return self.pattern
        if self.sparsity is not None:
            return f"{100 * self.sparsity:g}%"
        return f"-{self.n_prune}"


def split_count(total: int, sizes: list[int]) -> list[int]:
    """Split `total` over parts proportionally to `sizes`, exactly (largest remainder)."""
    s = sum(sizes)
    raw = [total * x / s for x in sizes]
    out = [int(r) for r in raw]
    rest = total - sum(out)
    order = sorted(range(len(sizes)), key=lambda i: raw[i] - out[i], reverse=True)
    for i in order[:rest]:
        out[i] += 1
    return out


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n highest-scoring of every m consecutive columns in each row (ragged tail: keep all)."""
    out_f, in_f = score.shape
    full = (in_f // m) * m
    mask = torch.ones_like(score, dtype=torch.bool)
    if full:
        s = score[:, :full].reshape(out_f, full // m, m)
        drop = torch.topk(s, m - n, dim=-1, largest=False).indices
        mk = torch.ones_like(s, dtype=torch.bool)
        mk.scatter_(-1, drop, False)
        mask[:, :full] = mk.reshape(out_f, full)
    return mask


def lowest_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """Mask that drops exactly the k lowest-scoring entries of `score` (flattened)."""
    mask = torch.ones(score.numel(), dtype=torch.bool, device=score.device)
    if k > 0:
        mask[torch.topk(score.reshape(-1), k, largest=False).indices] = False
    return mask.reshape(score.shape)


def output_error(w: torch.Tensor, w_hat: torch.Tensor, hessian: torch.Tensor) -> float:
    """Relative layer output error ‖(W−Ŵ)X‖² / ‖WX‖² from H = XᵀX/n."""
    d = (w - w_hat).float()
    num = torch.einsum("oi,ij,oj->", d, hessian, d)
    den = torch.einsum("oi,ij,oj->", w.float(), hessian, w.float())
    return float(num / den.clamp_min(1e-30))
