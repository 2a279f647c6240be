"""Channel shrinking without training (CSKV / MatryoshkaKV style): keys and values of every layer
and KV head are projected on the leading principal directions of calibration keys/values and
stored in that reduced dimension. The bases are nested (sorted by variance), so per-layer/head
ranks (`head_ranks`) are prefixes of one fitted basis — what the budget allocators choose."""
from __future__ import annotations

import dataclasses

import torch

from ..errors import ConfigError
from ..models.arch import cache_kwarg
from ..utils.device import forwards
from .base import KV_METHODS, KVMethod, RowStore


@torch.no_grad()
def fit_bases(model, ids: torch.Tensor, batch_size: int = 4) -> dict:
    """Mean and principal directions (D x D, descending variance) of the cached keys and values of
    every layer and KV head, from running `model` on calibration windows."""
    from transformers import DynamicCache

    sums: dict = {}
    dev = next(model.parameters()).device
    for s in range(0, len(ids), batch_size):
        cache = DynamicCache(config=model.config)
        with forwards(model):
            model(input_ids=ids[s:s + batch_size].to(dev), use_cache=True, **{cache_kwarg(model): cache})
        for li, layer in enumerate(cache.layers):
            for name, t in (("k", layer.keys), ("v", layer.values)):
                x = t.float().permute(1, 0, 2, 3).reshape(t.shape[1], -1, t.shape[3])  # (H, N, D)
                acc = sums.setdefault((li, name), [0, 0.0, 0.0])
                acc[0] += x.shape[1]
                acc[1] = acc[1] + x.sum(1)
                acc[2] = acc[2] + x.transpose(1, 2) @ x
    bases = {}
    for (li, name), (n, s1, s2) in sums.items():
        mean = s1 / n
        cov = s2 / n - mean[:, :, None] * mean[:, None, :]
        ev, vec = torch.linalg.eigh(cov)
        bases[(li, name)] = (mean, vec.flip(-1), ev.flip(-1))  # descending variance
    return bases


class ChannelStore(RowStore):
    def __init__(self, *a):
        super().__init__(*a)
        self.kp = self.vp = self.pos = None

    def _proj(self, name):
        mean, vec, _ = self.method.bases[(self.layer, name)]
        return mean.to(self.dtype), vec.to(self.dtype)

    def append(self, k, v, pos):
        rk, rv = self.method.ranks_of(self.layer)
        out = []
        for name, x, ranks in (("k", k, rk), ("v", v, rv)):
            mean, vec = self._proj(name)
            proj = [self.keep((x[h] - mean[h]) @ vec[h][:, : ranks[h]]) for h in range(x.shape[0])]
            out.append(proj)
        if self.kp is None:
            self.kp, self.vp, self.pos = out[0], out[1], pos
        else:
            self.kp = [torch.cat([a, b], 0) for a, b in zip(self.kp, out[0])]
            self.vp = [torch.cat([a, b], 0) for a, b in zip(self.vp, out[1])]
            self.pos = torch.cat([self.pos, pos])

    def materialize(self):
        rk, rv = self.method.ranks_of(self.layer)
        res = []
        for name, parts, ranks in (("k", self.kp, rk), ("v", self.vp, rv)):
            mean, vec = self._proj(name)
            res.append(torch.stack([mean[h] + self.give(parts[h]) @ vec[h][:, : ranks[h]].t()
                                    for h in range(len(parts))]))
        return res[0], res[1], self.pos.expand(len(self.kp), -1)

    def nbytes(self):
        if self.kp is None:
            return 0
        return sum(t.numel() * t.element_size() for t in self.kp + self.vp)


@KV_METHODS.register("channel")
@dataclasses.dataclass
class ChannelShrink(KVMethod):
    rank: int = 32  # kept dimensions per head (keys and values)
    head_ranks: list | None = None  # [layer][kv head] ranks (overrides `rank`)
    bases: dict | None = dataclasses.field(default=None, repr=False)  # from fit_bases()

    store = ChannelStore

    def __post_init__(self):
        if self.rank < 1:
            raise ConfigError("channel rank must be >= 1")

    def ranks_of(self, layer: int):
        if self.bases is None:
            raise ConfigError("channel shrinking needs bases: pass bases=fit_bases(model, calibration ids)")
        d = self.bases[(layer, "k")][1].shape[-1]
        h = self.bases[(layer, "k")][1].shape[0]
        r = list(self.head_ranks[layer]) if self.head_ranks is not None else [min(self.rank, d)] * h
        return r, r
