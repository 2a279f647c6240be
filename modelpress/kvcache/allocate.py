"""Per-layer, per-head cache budgets chosen by the weight pipeline's allocators.

Units are (layer, KV head) pairs; levels are KIVI bit-widths; a level's cost is its bits, which is
proportional to the cache bytes per token (scales and the full-precision window cost the same at
every level). `uniform`, `dp` (on per-head reconstruction errors measured on calibration keys and
values) and `evolutionary` (measuring the whole model: KL to the full-cache model, teacher-forced
with the compressed cache built incrementally) all apply, under one total cache-bytes budget.
"""
from __future__ import annotations


import numpy as np
import torch
import torch.nn.functional as F

from ..allocate import ALLOCATORS, Problem
from ..errors import BudgetError
from ..allocate.base import Fitness
from ..models.arch import cache_kwarg
from ..utils.device import forwards
from .base import make_cache, use_kv_cache
from .quant import KIVI, quant_keys, quant_values


@torch.no_grad()
def head_errors(model, ids: torch.Tensor, levels: tuple[int, ...], group: int = 32) -> list[list[float]]:
    """Relative reconstruction error of each (layer, KV head)'s keys + values at each bit-width."""
    from transformers import DynamicCache

    dev = next(model.parameters()).device
    cache = DynamicCache(config=model.config)
    with forwards(model):
        model(input_ids=ids.to(dev), use_cache=True, **{cache_kwarg(model): cache})
    out = []
    for layer in cache.layers:
        k = layer.keys.float().permute(1, 0, 2, 3).reshape(layer.keys.shape[1], -1, layer.keys.shape[3])
        v = layer.values.float().permute(1, 0, 2, 3).reshape(k.shape[0], -1, k.shape[2])
        t = (k.shape[1] // group) * group
        k, v = k[:, :t], v[:, :t]
        h, _, d = k.shape
        for head in range(h):
            errs = []
            for b in levels:
                bits = torch.tensor([b], device=k.device)
                kc, ks, kz = quant_keys(k[head].reshape(t // group, group, d), bits.repeat(t // group))
                kh = (kc.float() * ks.float() + kz.float()).reshape(t, d)
                vc, vs, vz = quant_values(v[head:head + 1], bits, group)
                gv = min(group, d)
                vh = (vc.reshape(1, t, d // gv, gv).float() * vs.float()[..., None] + vz.float()[..., None]).reshape(t, d)
                e = ((kh - k[head]) ** 2).sum() / (k[head] ** 2).sum() + ((vh - v[head]) ** 2).sum() / (v[head] ** 2).sum()
                errs.append(float(e))
            out.append(errs)
    return out


def kv_problem(model, ids: torch.Tensor, target_bits: float, levels=(2, 3, 4, 8), group: int = 32) -> Problem:
    cfg = model.config.get_text_config(decoder=True)
    n_layers = cfg.num_hidden_layers
    n_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    levels = tuple(sorted(levels))
    if not levels[0] <= target_bits <= levels[-1]:
        raise BudgetError(f"target of {target_bits:g} cache bits is outside the levels {levels[0]}..{levels[-1]}")
    errors = head_errors(model, ids, levels, group)
    units = [f"layer{l}.head{h}" for l in range(n_layers) for h in range(n_heads)]
    costs = [list(levels) for _ in units]
    return Problem(units, costs, errors, int(target_bits * len(units)), labels=[list(levels)] * len(units),
                   groups=[f"head{h}" for _ in range(n_layers) for h in range(n_heads)],
                   extra={"values": [list(levels)] * len(units), "n_heads": n_heads, "n_layers": n_layers,
                          "block": [l for l in range(n_layers) for _ in range(n_heads)]})


def head_bits_of(problem: Problem, choice: list[int]) -> list[list[int]]:
    h = problem.extra["n_heads"]
    bits = [problem.labels[u][i] for u, i in enumerate(choice)]
    return [bits[l * h:(l + 1) * h] for l in range(problem.extra["n_layers"])]


class KVFitness(Fitness):
    """KL(full-cache model ‖ compressed-cache model) on calibration windows: the first `prefill`
    tokens at once, the rest `step` tokens at a time with the cache built incrementally."""

    def __init__(self, model, problem: Problem, ids: torch.Tensor, *, prefill: int | None = None, step: int = 32,
                 group: int = 32, window: int = 32, storage: str | None = None):
        self.model, self.problem, self.ids = model, problem, ids
        prefill = ids.shape[1] // 4 if prefill is None else prefill
        if not 0 < prefill < ids.shape[1]:
            raise BudgetError(f"prefill {prefill} leaves nothing to decode in windows of {ids.shape[1]} tokens")
        self.prefill, self.step, self.group, self.window, self.storage = prefill, step, group, window, storage
        self.ref = {i: self._logprobs("full", dict(storage=storage), ids[i:i + 1]) for i in range(len(ids))}

    @torch.no_grad()
    def _logprobs(self, method, settings, batch) -> torch.Tensor:
        dev = next(self.model.parameters()).device
        batch = batch.to(dev)
        cache = make_cache(self.model, method, **settings)
        ck = {cache_kwarg(self.model): cache}
        with use_kv_cache(self.model, cache), forwards(self.model):
            self.model(input_ids=batch[:, : self.prefill], use_cache=True, **ck)
            outs = []
            for t in range(self.prefill, batch.shape[1], self.step):
                outs.append(self.model(input_ids=batch[:, t:t + self.step], use_cache=True, **ck).logits)
        return F.log_softmax(torch.cat(outs, 1).float(), -1)

    def new_sample(self, n_tokens: int, rng: np.random.Generator):
        n = min(len(self.ids), max(1, round(n_tokens / self.ids.shape[1])))
        return tuple(sorted(int(i) for i in rng.choice(len(self.ids), size=n, replace=False)))

    def __call__(self, choice, sample, parent=None) -> float:
        method = KIVI(group=self.group, window=self.window, head_bits=head_bits_of(self.problem, choice),
                      storage=self.storage)
        tot, n = 0.0, 0
        for i in sample:
            lp = self._logprobs(method, {}, self.ids[i:i + 1])
            ref = self.ref[i]
            tot += float((ref.exp() * (ref - lp)).sum())
            n += lp.shape[1]
        return tot / n


def allocate_kv_bits(model, ids: torch.Tensor, target_bits: float, allocator: str = "evolutionary", *,
                     levels=(2, 3, 4, 8), group: int = 32, window: int = 32, fitness_ids: torch.Tensor | None = None,
                     storage: str | None = None, **allocator_settings) -> tuple[list[list[int]], dict]:
    """Bits per (layer, KV head) averaging `target_bits`; returns (head_bits, info)."""
    problem = kv_problem(model, ids, target_bits, levels, group)
    alloc = ALLOCATORS.build(allocator, **allocator_settings)
    fitness = KVFitness(model, problem, fitness_ids if fitness_ids is not None else ids, group=group,
                        window=window, storage=storage) if alloc.needs_fitness else None
    choice = alloc.allocate(problem, fitness)
    return head_bits_of(problem, choice), {"cost": problem.cost(choice), "budget": problem.budget,
                                           "history": list(getattr(alloc, "history", []))}
