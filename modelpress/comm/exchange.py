"""Moving compressed gradients between workers with torch.distributed (gloo on CPU, NCCL on GPU).

`exchange` takes, per tensor, a compressor, the tensor to send and its persistent context, and
returns per tensor the average of all workers' decoded messages, this worker's own decoded message
(for error feedback) and the bytes this worker put on the wire. Messages of one kind travel
together: one all-reduce per dtype for summable payloads, one all-gather of a byte buffer for the
others, two all-reduces for all PowerSGD matrices.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .compressors.powersgd import PowerSGD, as_matrix, orthogonalize


def _world(group) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def _all_reduce(t: torch.Tensor, group) -> torch.Tensor:
    if _world(group) > 1:
        dist.all_reduce(t, group=group)
    return t


def _all_gather_bytes(buf: torch.Tensor, group) -> list[torch.Tensor]:
    w = _world(group)
    if w == 1:
        return [buf]
    out = [torch.empty_like(buf) for _ in range(w)]
    dist.all_gather(out, buf, group=group)
    return out


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def exchange(items: list[tuple], group=None) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
    """items: (compressor, x, ctx). Returns (averages, local decodes, bytes sent by this worker)."""
    world = _world(group)
    n = len(items)
    avgs: list = [None] * n
    locals_: list = [None] * n
    sent = 0
    power = [i for i, (c, x, _) in enumerate(items) if isinstance(c, PowerSGD) and c.compressible(x)]
    plain = [i for i in range(n) if i not in set(power)]

    # ---- summable payloads and uncompressed leftovers: one all-reduce per dtype -----------------
    red = [i for i in plain if items[i][0].allreduce or isinstance(items[i][0], PowerSGD)]
    payloads = {}
    for i in red:
        c, x, ctx = items[i]
        p = c.compress(x, ctx) if not isinstance(c, PowerSGD) else {"x": x}
        payloads[i] = p
        locals_[i] = c.decompress(p, x, ctx) if not isinstance(c, PowerSGD) else x
    by_dtype: dict = {}
    for i, p in payloads.items():
        for k, t in p.items():
            by_dtype.setdefault(t.dtype, []).append((i, k, t))
    for dtype, entries in by_dtype.items():
        flat = torch.cat([t.reshape(-1) for _, _, t in entries])
        sent += flat.numel() * flat.element_size()
        flat = _all_reduce(flat.clone(), group)
        off = 0
        for i, k, t in entries:
            payloads[i][k] = flat[off:off + t.numel()].reshape(t.shape)
            off += t.numel()
    for i, p in payloads.items():
        c, x, ctx = items[i]
        total = c.decompress(p, x, ctx) if not isinstance(c, PowerSGD) else p["x"]
        avgs[i] = total / world

    # ---- the rest: all-gather the messages, decode each worker's ------------------------------
    gat = [i for i in plain if i not in payloads]
    if gat:
        msgs = {i: items[i][0].compress(items[i][1], items[i][2]) for i in gat}
        layout = [(i, k, t.shape, t.dtype, t.numel() * t.element_size()) for i in gat for k, t in msgs[i].items()]
        buf = torch.cat([_as_bytes(t) for i in gat for t in msgs[i].values()])
        sent += buf.numel()
        for r, other in enumerate(_all_gather_bytes(buf, group)):
            off = 0
            decoded = {}
            for i, k, shape, dtype, nb in layout:
                decoded.setdefault(i, {})[k] = other[off:off + nb].view(dtype).reshape(shape)
                off += nb
            for i in gat:
                c, x, ctx = items[i]
                d = c.decompress(decoded[i], x, ctx)
                avgs[i] = d if avgs[i] is None else avgs[i] + d
        for i in gat:
            c, x, ctx = items[i]
            avgs[i] = avgs[i] / world
            locals_[i] = c.decompress(msgs[i], x, ctx)

    # ---- PowerSGD: P = Σ M Q, orthogonalize, Q = Σ Mᵀ P, M̂ = P Qᵀ / world ---------------------
    if power:
        ms = [as_matrix(items[i][1]) for i in power]
        qs = [items[i][0].init_q(items[i][1], items[i][2]) for i in power]
        ps = [m @ q for m, q in zip(ms, qs)]
        flat = torch.cat([p.reshape(-1) for p in ps])
        sent += flat.numel() * flat.element_size()
        flat = _all_reduce(flat, group)
        off, ps2 = 0, []
        for p in ps:
            ps2.append(orthogonalize(flat[off:off + p.numel()].reshape(p.shape)))
            off += p.numel()
        qs2 = [m.t() @ p for m, p in zip(ms, ps2)]
        flat = torch.cat([q.reshape(-1) for q in qs2])
        sent += flat.numel() * flat.element_size()
        flat = _all_reduce(flat, group)
        off = 0
        for j, i in enumerate(power):
            q = flat[off:off + qs2[j].numel()].reshape(qs2[j].shape)
            off += q.numel()
            items[i][2]["q"] = q / world
            approx = (ps2[j] @ q.t() / world).reshape(items[i][1].shape)
            avgs[i] = approx
            locals_[i] = approx  # PowerSGD's error feedback compares with the shared approximation
    return avgs, locals_, sent
