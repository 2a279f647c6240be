"""Uniform integer quantization grids: per-row (or per-group) scale and zero point.

Scales are rounded to float16 *before* codes are chosen, because float16 is how they are stored;
so the weight the model computes with is exactly the one the checkpoint reproduces.
Asymmetric: q = clamp(round(w/s) + z, 0, 2^b-1), z an integer in [0, 2^b-1] stored with b bits.
Symmetric: z = 2^(b-1) fixed (not stored), s = 2·max|w| / (2^b-1).
"""
from __future__ import annotations

import torch

_MIN_SCALE = 2.0 ** -24  # smallest positive float16


def maxq(bits: int) -> int:
    return (1 << bits) - 1


def _params_from_range(xmin: torch.Tensor, xmax: torch.Tensor, bits: int, sym: bool):
    mq = maxq(bits)
    if sym:
        scale = (xmax - xmin) / mq
        zero = torch.full_like(scale, float((mq + 1) // 2))
    else:
        scale = (xmax - xmin) / mq
    scale = scale.clamp_min(1e-8).to(torch.float16).float().clamp_min(_MIN_SCALE)
    if not sym:
        zero = torch.round(-xmin / scale).clamp(0, mq)
    return scale, zero


def find_params(w: torch.Tensor, bits: int, sym: bool, *, mse: bool = False,
                col_weight: torch.Tensor | None = None, grid: int = 80, maxshrink: float = 0.75):
    """Scale and zero per row of `w` (rows, cols): shapes (rows, 1).

    With `mse`, the range is shrunk on a grid and the choice minimising the (optionally
    column-weighted) squared error is kept per row: clipping outliers pays off at low bits.
    """
    w = w.float()
    xmin = w.min(dim=1, keepdim=True).values.clamp(max=0)
    xmax = w.max(dim=1, keepdim=True).values.clamp(min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    flat = (xmin == 0) & (xmax == 0)
    xmin = torch.where(flat, -torch.ones_like(xmin), xmin)
    xmax = torch.where(flat, torch.ones_like(xmax), xmax)
    scale, zero = _params_from_range(xmin, xmax, bits, sym)
    if not mse:
        return scale, zero
    # every candidate range at once (small tensors), then one pass over w per candidate
    shrink = torch.tensor([1 - k / grid for k in range(int(maxshrink * grid) + 1)],
                          dtype=torch.float32, device=w.device).view(-1, 1, 1)
    s_all, z_all = _params_from_range(xmin * shrink, xmax * shrink, bits, sym)  # (G, rows, 1)
    lo_all, hi_all = -z_all, maxq(bits) - z_all  # code - zero must stay in [-z, maxq - z]
    cw = None if col_weight is None else col_weight.float().reshape(-1)
    errs = torch.empty(len(shrink), w.shape[0], dtype=torch.float32, device=w.device)
    for k in range(len(shrink)):
        t = torch.div(w, s_all[k])
        d = torch.round(t)
        torch.maximum(d, lo_all[k], out=d)  # clamp_ with tensor bounds is several times slower
        torch.minimum(d, hi_all[k], out=d)
        d.sub_(t)  # (dequantized - w) / scale
        errs[k] = torch.linalg.vecdot(d, d) if cw is None else torch.mv(d.square_(), cw)
    errs.mul_(s_all.squeeze(-1).square())
    best = errs.argmin(dim=0)  # the first minimum: ties keep the widest range
    rows = torch.arange(w.shape[0], device=w.device)
    return s_all[best, rows], z_all[best, rows]


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes in [0, 2^bits - 1] (as float; cast to uint8 for storage)."""
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq(bits))


def n_groups(in_features: int, group_size: int | None) -> int:
    gs = group_size or in_features
    return -(-in_features // gs)
