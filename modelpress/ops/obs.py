"""The Optimal Brain Surgeon column sweep shared by GPTQ and SparseGPT.

Both methods walk the input columns in order; for each column they decide its final value
(quantized, or zero if pruned), and spread the error over the not-yet-processed columns using the
inverse layer Hessian H⁻¹ (H = XᵀX), through its upper Cholesky factor U (H⁻¹ = UᵀU). Updates are
applied lazily in blocks of columns (Frantar et al., GPTQ / SparseGPT). Pruning (unstructured per
block, or N:M) and quantization (per group, groups formed in sweep order) may be combined.
"""
from __future__ import annotations

import dataclasses
import logging

import torch

from .base import split_count
from .quant.grid import find_params, n_groups

log = logging.getLogger(__name__)

_INNER = 16  # sub-block width inside a lazy-update block (see obs_sweep)


def shrink_hessian(h: torch.Tensor, shrink: float, inplace: bool = False) -> torch.Tensor:
    """(1 − s)·H + s·diag(H): keeps every input channel's energy and weakens the correlations
    between channels, the part of XᵀX most particular to the calibration text (s = 1 leaves a
    diagonal Hessian: each weight's error weighted by its input's energy alone)."""
    if not shrink:
        return h
    if not 0.0 <= shrink <= 1.0:
        raise ValueError(f"shrink must be in [0, 1], got {shrink}")
    if inplace:
        diag = torch.diagonal(h).clone()
        h.mul_(1.0 - shrink).diagonal().copy_(diag)
        return h
    out = h * (1.0 - shrink)
    out.diagonal().copy_(torch.diagonal(h))
    return out


def inverse_hessian_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + λI)⁻¹, λ = damp · mean(diag H); damping grows if H is singular.

    At most three in×in matrices are alive at once (the damped copy, its factor, the inverse):
    for a 14336-wide down_proj each is 0.8 GB."""
    diag_mean = torch.diagonal(h).mean().clamp_min(1e-12)
    lam = damp
    for _ in range(8):
        hd = h.clone()
        hd.diagonal().add_(lam * diag_mean)
        l, info = torch.linalg.cholesky_ex(hd)
        del hd
        if not info:
            hinv = torch.cholesky_inverse(l)
            del l
            u, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if not info:
                return u
        lam = lam * 10 if lam > 0 else 1e-4
        log.debug("Hessian not positive definite; damping raised to %g", lam)
    raise RuntimeError("layer Hessian could not be made positive definite")


def live_hessian(h: torch.Tensor, copy: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """A float32 copy of H (H itself when not `copy` and already float32) whose dead inputs
    (columns no calibration token activates, H_jj = 0) get a unit diagonal, so H can be damped and
    factored; also the dead-column mask."""
    h = h.float()
    h = h.clone() if copy else h
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    return h, dead


@dataclasses.dataclass
class SweepResult:
    weight: torch.Tensor  # reconstructed weight, sweep (permuted) column order
    mask: torch.Tensor | None  # kept entries, sweep order
    codes: torch.Tensor | None  # codes (out, in), sweep order: uint8, int16 on a GGML grid
    scales: torch.Tensor | None  # float16 (out, n_groups)
    zeros: torch.Tensor | None  # uint8 (out, n_groups)
    perm: torch.Tensor | None  # sweep order -> original column
    groups_permuted: bool = True  # groups formed in sweep order (False: static groups, original column order)


def obs_sweep(w: torch.Tensor, h: torch.Tensor, *, bits: int | None = None, group_size: int | None = None,
              sym: bool = False, mse: bool = False, n_prune: int | None = None, nm: tuple[int, int] | None = None,
              act_order: bool = False, damp: float = 0.01, block_size: int = 128,
              clip_by: str = "weights", static_groups: bool = False, own_h: bool = False,
              grid=None) -> SweepResult:
    """Compress `w` (out, in) given H = XᵀX/n (in, in). Returns the result in sweep order.

    `clip_by` weighs the clipping search's squared error (`mse`) per input column: "weights"
    equally, "activations" by the column's input energy diag(H). With `act_order`, quantization
    groups are formed in sweep order unless `static_groups`: then every group is a run of
    `group_size` columns in the original order, its range fixed from the weights before the sweep
    (what compressed-tensors / vLLM store: their actorder "weight"), and only the order in which
    columns are quantized follows the activations. `own_h`: `h` is the caller's to give away (it
    is overwritten and freed early: one in×in matrix less at the peak).

    `grid` (a GGML type's, ops/ggml_grids.py): every run of `grid.group` columns gets its
    parameters from the type's rule on the columns as the sweep has updated them, codes are the
    nearest grid values; `codes` come back as int16 (the grid holds the parameters and encodes)."""
    if clip_by not in ("weights", "activations"):
        raise ValueError(f"clip_by is weights or activations, got {clip_by!r}")
    if grid is not None:
        if act_order or mse or n_prune or nm or bits is not None:
            raise ValueError("a GGML grid is swept in column order, without bits, clipping search or pruning")
        group_size = grid.group
    w = w.float().clone()
    h, dead = live_hessian(h, copy=not own_h)
    out_f, in_f = w.shape
    w[:, dead] = 0.0

    quant = bits is not None or grid is not None
    static = bool(static_groups and act_order and quant and group_size and not (n_prune or nm))
    energy = torch.diagonal(h).clone() if clip_by == "activations" else None
    fixed = None
    if static:  # each original group's range, from the weights as they are before any update
        fixed = [find_params(w[:, g:g + group_size], bits, sym, mse=mse,
                             col_weight=None if energy is None else energy[g:g + group_size])
                 for g in range(0, in_f, group_size)]
    perm = None
    if act_order:
        perm = torch.argsort(torch.diagonal(h), descending=True)
        w = w[:, perm]
        h = h[perm][:, perm]
        energy = energy[perm] if energy is not None else None
    u = inverse_hessian_factor(h, damp)
    del h

    gs = group_size or in_f
    if quant and group_size:
        block_size = max(gs, (block_size // gs) * gs)  # groups never straddle a block
    if nm is not None:
        block_size = max(nm[1], (block_size // nm[1]) * nm[1])
    starts = list(range(0, in_f, block_size))
    block_counts = None
    if n_prune is not None:
        block_counts = split_count(n_prune, [min(block_size, in_f - s) * out_f for s in starts])

    codes = torch.zeros(out_f, in_f, dtype=torch.int16 if grid is not None else torch.uint8, device=w.device) if quant else None
    ng = n_groups(in_f, group_size)
    scales = torch.zeros(out_f, ng, dtype=torch.float32, device=w.device) if bits is not None else None
    zeros = torch.zeros(out_f, ng, dtype=torch.float32, device=w.device) if bits is not None else None
    if fixed is not None:
        for gi, (scale, zero) in enumerate(fixed):
            scales[:, gi:gi + 1], zeros[:, gi:gi + 1] = scale, zero
        col_group = (perm // group_size).tolist()  # sweep position -> its original group
    mask = torch.ones(out_f, in_f, dtype=torch.bool, device=w.device) if (n_prune or nm) else None
    q_all = torch.zeros_like(w)
    mq = (1 << bits) - 1 if bits is not None else 0
    scale1 = zero1 = None
    if quant and not group_size:
        scale, zero = find_params(w, bits, sym, mse=mse, col_weight=energy)
        scales[:, 0:1], zeros[:, 0:1] = scale, zero
        scale1, zero1 = scale.squeeze(1), zero.squeeze(1)

    for bi, i1 in enumerate(starts):
        i2 = min(i1 + block_size, in_f)
        cnt = i2 - i1
        # the block is held transposed (columns x rows), so each column is contiguous in memory
        w1 = w[:, i1:i2].t().contiguous()
        q1 = torch.zeros_like(w1)
        codes1 = torch.zeros_like(w1) if quant else None
        err1 = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        d = torch.diagonal(u1)
        dl = d.tolist()
        m1 = None
        if mask is not None:
            m1 = torch.ones(cnt, out_f, dtype=torch.bool, device=w.device)
            if block_counts is not None and block_counts[bi]:
                score = w1 * w1 / (d * d).unsqueeze(1)
                m1.view(-1)[torch.topk(score.reshape(-1), block_counts[bi], largest=False).indices] = False
        # Within the block, errors are pushed eagerly only up to the end of a short sub-block
        # (rank-1 updates over <= _INNER columns) and to the rest of the block by one matmul per
        # sub-block. Sub-blocks end before every quantization group and N:M group, whose decisions
        # need the columns fully updated.
        bounds = [j for j in range(cnt) if j % _INNER == 0 or (quant and group_size and (i1 + j) % gs == 0)
                  or (nm is not None and j % nm[1] == 0)] + [cnt]
        for a, b in zip(bounds[:-1], bounds[1:]):
            for i in range(a, b):
                col = i1 + i
                wc = w1[i]
                if nm is not None and i % nm[1] == 0 and i + nm[1] <= cnt:
                    n_keep, m = nm
                    score = w1[i:i + m] ** 2 / (d[i:i + m] ** 2).unsqueeze(1)
                    drop = torch.topk(score, m - n_keep, dim=0, largest=False).indices
                    m1[i:i + m].scatter_(0, drop, False)
                if fixed is not None:
                    g = col_group[col]
                    scale1, zero1 = scales[:, g], zeros[:, g]
                elif grid is not None and col % gs == 0:
                    grid.start(col, w1[i:i + gs].t())
                elif quant and group_size and col % gs == 0:
                    grp = w1[i:i + gs]
                    if m1 is not None:
                        grp = grp * m1[i:i + gs]
                    scale, zero = find_params(grp.t().contiguous(), bits, sym, mse=mse,
                                              col_weight=None if energy is None else energy[col:col + gs])
                    scales[:, col // gs:col // gs + 1], zeros[:, col // gs:col // gs + 1] = scale, zero
                    scale1, zero1 = scale.squeeze(1), zero.squeeze(1)
                qc = wc if m1 is None else wc * m1[i]
                if grid is not None:
                    codes1[i], q1[i] = grid.round(col, qc)
                    qc = q1[i]
                elif quant:
                    c = codes1[i]
                    torch.div(qc, scale1, out=c).round_().add_(zero1).clamp_(0, mq)
                    qc = torch.sub(c, zero1, out=q1[i]).mul_(scale1)
                    if m1 is not None:
                        qc.mul_(m1[i])
                else:
                    q1[i] = qc
                e = torch.sub(wc, qc, out=err1[i]).div_(dl[i])
                w1[i:b].addr_(u1[i, i:b], e, alpha=-1.0)
            if b < cnt:
                w1[b:].addmm_(u1[a:b, b:].t(), err1[a:b], alpha=-1.0)
        q_all[:, i1:i2] = q1.t()
        if quant:
            codes[:, i1:i2] = codes1.t().to(codes.dtype)
        if m1 is not None:
            mask[:, i1:i2] = m1.t()
        if i2 < in_f:
            w[:, i2:].addmm_(err1.t(), u[i1:i2, i2:], alpha=-1.0)

    return SweepResult(
        weight=q_all, mask=mask, codes=codes,
        scales=scales.to(torch.float16) if bits is not None else None,
        zeros=zeros.to(torch.uint8) if bits is not None and not sym else None,
        perm=perm, groups_permuted=not static,
    )


def to_packed(res: SweepResult, bits: int | None, group_size: int | None, sym: bool):
    """The sweep's result as a PackedWeight in the original column order."""
    from .packed import PackedWeight

    out_f, in_f = res.weight.shape
    perm = res.perm

    def unperm(x):
        if x is None or perm is None:
            return x
        y = torch.empty_like(x)
        y[:, perm] = x
        return y

    mask = unperm(res.mask)
    if bits is None:
        w = unperm(res.weight)
        vals = w[mask] if mask is not None else w.reshape(-1)
        return PackedWeight(shape=(out_f, in_f), mask=mask, values=vals.to(torch.float16))
    codes = unperm(res.codes)
    return PackedWeight(shape=(out_f, in_f), mask=mask, bits=bits, group_size=group_size, sym=sym,
                        codes=codes[mask] if mask is not None else codes.reshape(-1),
                        scales=res.scales, zeros=res.zeros, perm=perm if res.groups_permuted else None)


def refit_masked(w: torch.Tensor, h: torch.Tensor, mask: torch.Tensor, start: torch.Tensor, *,
                 damp: float = 0.01, iters: int = 30, tol: float = 1e-4) -> torch.Tensor:
    """The best weights on a fixed sparsity mask: argmin over X with X = 0 off `mask` of
    tr((W − X) H (W − X)ᵀ), i.e. ‖(W − X)Xcal‖², with H damped as in the sweep.

    The OBS sweep decides each column once and never revisits it, so the kept weights are not
    optimal for the final mask (Boža, 2024, fits them with ADMM). Each row is an independent
    least-squares problem on its own support; all rows are solved at once by masked conjugate
    gradients with a Jacobi preconditioner, started from the sweep's result (`start`), one
    (out × in × in) matmul per iteration. Returns X (zeros off the mask)."""
    h, _ = live_hessian(h)
    h.diagonal().add_(damp * torch.diagonal(h).mean().clamp_min(1e-12))
    m = mask.float()
    x = start.float() * m
    pinv = 1.0 / torch.diagonal(h)
    r = m * ((w.float() - x) @ h)  # minus the gradient, on the support
    r0 = r.norm(dim=1).clamp_min(1e-30)
    z = r * pinv
    p = z.clone()
    rz = (r * z).sum(1)
    for _ in range(iters):
        ap = m * (p @ h)
        pap = (p * ap).sum(1)
        alpha = torch.where(pap > 0, rz / pap.clamp_min(1e-30), torch.zeros_like(pap))
        x.add_(alpha.unsqueeze(1) * p)
        r.sub_(alpha.unsqueeze(1) * ap)
        if float((r.norm(dim=1) / r0).max()) < tol:
            break
        z = r * pinv
        rz_new = (r * z).sum(1)
        beta = torch.where(rz > 0, rz_new / rz.clamp_min(1e-30), torch.zeros_like(rz))
        p = z + beta.unsqueeze(1) * p
        rz = rz_new
    return x * m
