"""PowerSGD (Vogels et al., 2019): one power-iteration step per round. Each matrix M (n x m) is
approximated by P Qᵀ with rank r: P = M Q (all-reduced, orthogonalized), Q = Mᵀ P (all-reduced).
Q is warm-started from the previous step. Vectors (biases, norms) go uncompressed."""
from __future__ import annotations

import dataclasses

import torch

from ...errors import ConfigError
from .base import COMPRESSORS, Compressor


def orthogonalize(p: torch.Tensor) -> torch.Tensor:
    q, _ = torch.linalg.qr(p.float())
    return q.to(p.dtype)


def as_matrix(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1) if x.dim() > 1 else x.reshape(1, -1)


@COMPRESSORS.register("powersgd")
@dataclasses.dataclass
class PowerSGD(Compressor):
    rank: int = 4
    seed: int = 0

    level_field = "rank"

    def __post_init__(self):
        if self.rank < 1:
            raise ConfigError("powersgd rank must be >= 1")

    def compressible(self, x: torch.Tensor) -> bool:
        if x.dim() < 2:
            return False
        n, m = as_matrix(x).shape
        return self.rank * (n + m) < n * m

    def init_q(self, x: torch.Tensor, ctx: dict) -> torch.Tensor:
        m = as_matrix(x).shape[1]
        q = ctx.get("q")
        if q is not None and q.shape == (m, self.rank):
            return q
        g = torch.Generator().manual_seed(self.seed + 17 * ctx.get("key", 0))
        fresh = torch.randn(m, self.rank, generator=g).to(x.device, x.dtype)
        if q is not None and q.shape[0] == m:  # rank changed (L-GreCo): keep the warm directions
            keep = min(q.shape[1], self.rank)
            fresh[:, :keep] = q[:, :keep]
        return orthogonalize(fresh)

    def nbytes_for(self, x: torch.Tensor) -> int:
        if not self.compressible(x):
            return x.numel() * 4
        n, m = as_matrix(x).shape
        return 4 * self.rank * (n + m)

    def local_error(self, x: torch.Tensor) -> float:
        """Best rank-r error of x (what an exact low-rank step would lose), for L-GreCo."""
        if not self.compressible(x):
            return 0.0
        s = torch.linalg.svdvals(as_matrix(x).float())
        return float((s[self.rank:] ** 2).sum())
