"""Shared low-rank algebra: truncated factorizations in an activation-aware metric.

The layer's output error for a weight change Δ is ‖XΔᵀ‖² = tr(Δ H Δᵀ) with H = XᵀX. For any square
root R of H (H = R Rᵀ) that error is ‖Δ R‖_F², so the best rank-r approximation of W in that metric
is the truncated SVD of W R mapped back by R⁻¹ (Eckart–Young).
"""
from __future__ import annotations

import torch


def truncated(m: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """m ≈ B @ A with B (out, r) = U_r S_r and A (r, in) = V_rᵀ."""
    u, s, vh = torch.linalg.svd(m.float(), full_matrices=False)
    r = max(0, min(rank, s.numel()))
    return u[:, :r] * s[:r], vh[:r]


def eigen_root(h: torch.Tensor, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Q Λ^½ and Λ^-½ Qᵀ for H + λI = Q Λ Qᵀ (λ = damp · mean diag H): a square root of H and its inverse."""
    h = h.float()
    lam = damp * torch.diagonal(h).mean().clamp_min(1e-12)
    ev, q = torch.linalg.eigh(h + lam * torch.eye(h.shape[0], device=h.device))
    ev = ev.clamp_min(lam)
    return q * ev.sqrt(), (q * ev.rsqrt()).t()


def activation_aware(m: torch.Tensor, h: torch.Tensor, rank: int, damp: float = 0.01, roots=None):
    """Best rank-r B, A with m ≈ B A in the metric of H: SVD of m·R, mapped back with R⁻¹.
    `roots` = eigen_root(h, damp), when several factorizations share one H."""
    root, inv = roots if roots is not None else eigen_root(h, damp)
    b, a = truncated(m.float() @ root, rank)
    return b, a @ inv


def activation_aware_ranks(m: torch.Tensor, h: torch.Tensor, ranks, damp: float = 0.01) -> dict[int, tuple]:
    """`activation_aware` at several ranks from one eigendecomposition and one SVD: {rank: (B, A)}."""
    root, inv = eigen_root(h, damp)
    u, s, vh = torch.linalg.svd(m.float() @ root, full_matrices=False)
    return {r: (u[:, :r] * s[:r], vh[:r] @ inv) for r in ranks}
