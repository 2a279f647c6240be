"""Token eviction: the cache keeps a fixed number of tokens per head and drops the rest.

- streamingllm: attention sinks (the first `sinks` tokens) + the most recent tokens (Xiao et al.)
- h2o:          heavy hitters by accumulated attention + a recent window (Zhang et al.)
- snapkv:       votes from an observation window of recent queries, max-pooled over neighbouring
                positions (Li et al.); at prefill the window is the prompt's last queries, during
                decoding it is a running (decayed) sum over recent queries
- ems:          evict-then-merge per head: low-score tokens are merged into the most similar kept
                token (key cosine), weighted by their scores, instead of being lost
Evicted tokens are gone: the cache holds `budget` tokens' keys and values per head.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .base import KV_METHODS, KVMethod, RowStore


class EvictStore(RowStore):
    def __init__(self, *a):
        super().__init__(*a)
        self.k = self.v = self.pos = self.score = None  # (H, m, D) (H, m, D) (H, m) (H, m)
        self.order = None  # (H, m) arrival index among stored tokens (sinks = first ones)
        self.count = 0

    def append(self, k, v, pos):
        k, v = self.keep(k), self.keep(v)
        h, n = k.shape[0], k.shape[1]
        p = pos.expand(h, -1)
        o = torch.arange(self.count, self.count + n, device=k.device).expand(h, -1)
        z = torch.zeros(h, n, device=k.device)
        self.count += n
        if self.k is None:
            self.k, self.v, self.pos, self.score, self.order = k, v, p, z, o
        else:
            self.k = torch.cat([self.k, k], 1)
            self.v = torch.cat([self.v, v], 1)
            self.pos = torch.cat([self.pos, p], 1)
            self.score = torch.cat([self.score, z], 1)
            self.order = torch.cat([self.order, o], 1)

    def materialize(self):
        return self.give(self.k), self.give(self.v), self.pos

    def budget(self) -> int:
        return self.method.budget_of(self.layer)

    def protected(self) -> torch.Tensor:
        """(H, m) tokens never evicted: the recent window."""
        m = self.k.shape[1]
        prot = torch.zeros(self.k.shape[0], m, dtype=torch.bool, device=self.k.device)
        prot[:, max(0, m - self.method.window):] = True
        return prot

    def priority(self) -> torch.Tensor:
        return self.score

    def compact(self):
        if self.k is None:
            return
        m, cap = self.k.shape[1], self.budget()
        if m <= cap:
            return
        pr = self.priority().masked_fill(self.protected(), float("inf"))
        keep = torch.topk(pr, cap, dim=1).indices.sort(dim=1).values  # (H, cap) in arrival order
        drop = None
        if self.method.merge:
            mask = torch.ones_like(pr, dtype=torch.bool)
            mask.scatter_(1, keep, False)
            drop = mask
        if drop is not None:
            self._merge(keep, drop)
        g = keep.unsqueeze(-1).expand(-1, -1, self.k.shape[2])
        self.k, self.v = self.k.gather(1, g), self.v.gather(1, g)
        self.pos, self.score, self.order = (t.gather(1, keep) for t in (self.pos, self.score, self.order))

    def _merge(self, keep, drop):
        for h in range(self.k.shape[0]):
            d_idx = drop[h].nonzero().squeeze(1)
            if d_idx.numel() == 0:
                continue
            kept = keep[h]
            sim = F.normalize(self.k[h, d_idx].float(), dim=-1) @ F.normalize(self.k[h, kept].float(), dim=-1).t()
            target = kept[sim.argmax(1)]
            w_d = self.score[h, d_idx].clamp_min(1e-6)
            w_t = self.score[h].clamp_min(1e-6).clone()
            acc_k = self.k[h].float() * w_t[:, None]
            acc_v = self.v[h].float() * w_t[:, None]
            tot = w_t.clone()
            acc_k.index_add_(0, target, self.k[h, d_idx].float() * w_d[:, None])
            acc_v.index_add_(0, target, self.v[h, d_idx].float() * w_d[:, None])
            tot.index_add_(0, target, w_d)
            self.k[h] = (acc_k / tot[:, None]).to(self.k.dtype)
            self.v[h] = (acc_v / tot[:, None]).to(self.v.dtype)
            self.score[h] = tot

    def nbytes(self):
        return 0 if self.k is None else (self.k.numel() + self.v.numel()) * self.k.element_size()


@dataclasses.dataclass
class EvictMethod(KVMethod):
    """Settings every eviction method shares: tokens kept per head (optionally per layer), of which
    the most recent `window` are always kept."""

    budget: int = 256
    window: int = 32
    layer_budgets: list | None = None

    merge = False

    def __post_init__(self):
        self.check()

    def budget_of(self, layer: int) -> int:
        return int(self.layer_budgets[layer]) if self.layer_budgets is not None else int(self.budget)

    def check(self):
        if self.budget < 1 or self.window < 0 or self.window > self.budget:
            raise ConfigError("eviction needs budget >= 1 and 0 <= window <= budget")


class StreamingStore(EvictStore):
    def priority(self):
        sink = self.order < self.method.sinks
        return torch.where(sink, torch.full_like(self.score, 1e9), self.order.float())  # then newest first


@KV_METHODS.register("streamingllm")
@dataclasses.dataclass
class StreamingLLM(EvictMethod):
    sinks: int = 4

    store = StreamingStore


class H2OStore(EvictStore):
    def observe(self, probs, qpos):
        self.score += probs.sum(1)


@KV_METHODS.register("h2o")
@dataclasses.dataclass
class H2O(EvictMethod):
    store = H2OStore
    scores = True


class SnapStore(EvictStore):
    def observe(self, probs, qpos):
        w, k = self.method.obs_window, self.method.kernel
        votes = probs[:, -w:].sum(1)  # the observation window's queries
        pooled = F.max_pool1d(votes[:, None], kernel_size=k, stride=1, padding=k // 2)[:, 0, : votes.shape[1]]
        decay = 1.0 - 1.0 / max(w, 1)
        self.score = self.score * (decay ** probs.shape[1]) + pooled


@KV_METHODS.register("snapkv")
@dataclasses.dataclass
class SnapKV(EvictMethod):
    obs_window: int = 32
    kernel: int = 7

    store = SnapStore
    scores = True


@KV_METHODS.register("ems")
@dataclasses.dataclass
class EMS(EvictMethod):
    store = H2OStore
    scores = True
    merge = True
