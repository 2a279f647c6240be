"""Compressed KV caches for Hugging Face causal LMs.

A `KVCache` is a transformers `Cache` whose layers keep, for every batch row, a compressed store
of that row's keys and values. Padding tokens are never stored, so a padded batch computes exactly
what the rows would compute one by one. While `use_kv_cache(...)` is active, the model's attention
runs through `kv_attention`, which builds its mask from the stored entries' positions (so evicted or
merged caches stay causal and padding-free) and hands the attention probabilities back to methods
that score tokens (H2O, SnapKV, ZipCache, EMS). Nothing is patched at import; the context manager
restores the model's attention implementation and removes its hook on exit.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from typing import ClassVar, Iterator

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ..errors import ConfigError, UnsupportedArchitectureError
from ..registry import Registry
from ..utils.device import full_precision

KV_METHODS: Registry = Registry("kv method")
ATTN_NAME = "modelpress_kv"


class RowStore:
    """One batch row of one layer: appends new (H, n, D) keys/values with their positions, and
    gives back what attention should see. Subclasses compress."""

    def __init__(self, method: "KVMethod", layer: int, n_heads: int, head_dim: int, dtype: torch.dtype):
        self.method = method
        self.layer = layer
        self.n_heads = n_heads
        self.head_dim = head_dim
        self.dtype = dtype  # what attention computes in
        self.store_dtype = method.storage_dtype(dtype)  # what uncompressed entries are kept in
        self.seen = 0  # tokens appended so far

    def keep(self, x: torch.Tensor) -> torch.Tensor:
        """An uncompressed tensor as the cache holds it."""
        return x.to(self.store_dtype)

    def give(self, x: torch.Tensor) -> torch.Tensor:
        """A held tensor as attention consumes it."""
        return x.to(self.dtype)

    def append(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> None:
        raise NotImplementedError

    def materialize(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys (H, m, D), values (H, m, D) and positions (H, m) of every entry attention sees."""
        raise NotImplementedError

    def observe(self, probs: torch.Tensor, qpos: torch.Tensor) -> None:
        """Attention probabilities (H_kv, n_queries, m) over the materialized entries (summed over a
        GQA group) for queries at positions qpos. Scoring methods use it; others ignore it."""

    def compact(self) -> None:
        """Compress / evict down to the method's budget. Called after each attention step, so the
        tokens of the current step are always attended exactly."""

    def nbytes(self) -> int:
        raise NotImplementedError


@dataclasses.dataclass
class KVMethod:
    """A registered dataclass: the settings of one cache method and its RowStore.

    `storage` is the dtype of the entries a method keeps uncompressed (recent windows, kept tokens,
    projections): None = the model's dtype (exact); "float16" / "bfloat16" hold a float32 model's
    cache at half width, as a 16-bit deployment would."""

    storage: str | None = None

    registered_name: ClassVar[str]
    store: ClassVar[type[RowStore]]
    scores: ClassVar[bool] = False  # needs attention probabilities

    def storage_dtype(self, dtype: torch.dtype) -> torch.dtype:
        if self.storage is None:
            return dtype
        dt = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}.get(self.storage)
        if dt is None:
            raise ConfigError(f"storage must be float16, bfloat16 or float32, got {self.storage!r}")
        return dt

    def label(self) -> str:
        fields = ", ".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self)
                           if f.name not in ("per_layer", "bases") and getattr(self, f.name) is not None)
        return f"{self.registered_name}({fields})"

    def for_layer(self, layer: int) -> "KVMethod":
        """The settings of one layer (methods with per-layer/head budgets override this)."""
        return self


class KVLayer(CacheLayerMixin):
    is_compileable = False
    is_sliding = False

    def __init__(self, cache: "KVCache", layer: int):
        super().__init__()
        self.cache = cache
        self.layer = layer
        self.rows: list[RowStore] = []
        self.n_new = 0
        self._entry_pos: torch.Tensor | None = None  # (B, H, M) positions of what attention saw
        self._lengths: torch.Tensor | None = None  # (B, H)

    def lazy_initialization(self, key_states, value_states) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        with full_precision(key_states.device):  # the cache's own arithmetic: not the forward's autocast
            return self._update(key_states, value_states)

    def _update(self, key_states: torch.Tensor, value_states: torch.Tensor):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        b, h, n, d = key_states.shape
        method = self.cache.method.for_layer(self.layer)
        while len(self.rows) < b:
            self.rows.append(method.store(method, self.layer, h, d, key_states.dtype))
        valid = self.cache.new_token_mask(b, n, key_states.device)  # (B, n) not padding
        outs = []
        for r in range(b):
            row = self.rows[r]
            keep = valid[r]
            pos = torch.arange(row.seen, row.seen + n, device=key_states.device)
            row.append(key_states[r][:, keep], value_states[r][:, keep], pos[keep])
            row.seen += n
            row.tokens = getattr(row, "tokens", 0) + int(keep.sum())
            outs.append(row.materialize())
        self.row_m = [k.shape[1] for k, _, _ in outs]
        self.n_new = n
        if b == 1:  # no padding to line rows up: hand attention the row's own tensors
            k, v, p = outs[0]
            self._entry_pos = p.unsqueeze(0)
            return k.unsqueeze(0), v.unsqueeze(0)
        m = max(k.shape[1] for k, _, _ in outs)
        keys = key_states.new_zeros(b, h, m, d)
        values = value_states.new_zeros(b, h, m, d)
        entry_pos = torch.full((b, h, m), 1 << 60, dtype=torch.long, device=key_states.device)
        for r, (k, v, p) in enumerate(outs):
            keys[r, :, : k.shape[1]] = k
            values[r, :, : v.shape[1]] = v
            entry_pos[r, :, : p.shape[1]] = p
        self._entry_pos = entry_pos
        self.n_new = n
        return keys, values

    def query_positions(self, b: int) -> torch.Tensor:
        """(B, n) positions of the current queries in each row's own token count (pads excluded)."""
        return torch.stack([torch.arange(r.seen - self.n_new, r.seen, device=self._entry_pos.device)
                            for r in self.rows[:b]])

    def get_seq_length(self) -> int:
        return self.rows[0].seen if self.rows else 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def nbytes(self) -> int:
        return sum(r.nbytes() for r in self.rows)

    def reset(self) -> None:
        self.rows = []
        self.is_initialized = False


class KVCache(Cache):
    """A compressed KV cache. Use it inside `use_kv_cache(model, cache)` (or via `kv_session`)."""

    def __init__(self, method: KVMethod, n_layers: int):
        method.storage_dtype(torch.float32)  # a bad `storage` fails here, not mid-generation
        self.method = method
        super().__init__(layers=[KVLayer(self, i) for i in range(n_layers)])
        self.pad_mask: torch.Tensor | None = None  # (B, tokens so far) True = real token

    def new_token_mask(self, b: int, n: int, device) -> torch.Tensor:
        if self.pad_mask is None:
            return torch.ones(b, n, dtype=torch.bool, device=device)
        return self.pad_mask[:b, -n:].to(device=device, dtype=torch.bool)

    def nbytes(self) -> int:
        """Exact bytes the compressed cache holds (codes, scales, factors, indices, kept tensors)."""
        return sum(layer.nbytes() for layer in self.layers)

    def full_nbytes(self) -> int:
        """Bytes an uncompressed cache of the same tokens would hold (in the storage dtype)."""
        total = 0
        for layer in self.layers:
            for r in layer.rows:
                total += 2 * r.n_heads * r.head_dim * r.tokens * torch.empty(0, dtype=r.store_dtype).element_size()
        return total

    def tokens(self) -> int:
        return sum(r.seen for r in self.layers[0].rows) if self.layers else 0


class Buffer:
    """A tensor that grows along one dimension with amortized doubling (no copy per append)."""

    def __init__(self, dim: int):
        self.dim = dim
        self.data: torch.Tensor | None = None
        self.n = 0

    def append(self, x: torch.Tensor) -> None:
        need = self.n + x.shape[self.dim]
        if self.data is None or need > self.data.shape[self.dim]:
            shape = list(x.shape)
            shape[self.dim] = max(need, 2 * (0 if self.data is None else self.data.shape[self.dim]), 16)
            new = x.new_empty(shape)
            if self.data is not None:
                new.narrow(self.dim, 0, self.n).copy_(self.view())
            self.data = new
        self.data.narrow(self.dim, self.n, x.shape[self.dim]).copy_(x)
        self.n = need

    def view(self) -> torch.Tensor:
        return self.data.narrow(self.dim, 0, self.n)


def kv_attention(module, query, key, value, attention_mask, scaling: float | None = None, dropout: float = 0.0,
                 **kwargs):
    """Attention over a KVCache's entries with a mask made from their positions."""
    cache = _ACTIVE_CACHE.get()
    layer = cache.layers[module.layer_idx] if cache is not None else None
    b, hq, nq, d = query.shape
    hkv, m = key.shape[1], key.shape[2]
    n_rep = hq // hkv
    scaling = scaling if scaling is not None else 1 / math.sqrt(d)
    # grouped-query attention without repeating keys: (B, Hkv, n_rep * nq, D) x (B, Hkv, D, M)
    q = query.reshape(b, hkv, n_rep * nq, d)
    scores = torch.matmul(q.float(), key.float().transpose(-1, -2)).mul_(scaling).reshape(b, hkv, n_rep, nq, m)
    if layer is not None and layer._entry_pos is not None:
        qpos = layer.query_positions(b)  # (B, nq)
        allowed = layer._entry_pos[:, :, None, None, :] <= qpos[:, None, None, :, None]  # (B, Hkv, 1, nq, M)
    else:  # not through a KVCache (e.g. no cache): plain causal
        allowed = torch.ones(nq, m, dtype=torch.bool, device=query.device).tril(m - nq)[None, None, None]
    scores = scores.masked_fill_(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num_(0.0)  # a padding query sees nothing
    out = torch.matmul(probs.reshape(b, hkv, n_rep * nq, m).to(value.dtype), value).reshape(b, hq, nq, d)
    if layer is not None and layer._entry_pos is not None:
        with full_precision(query.device):
            grouped = probs.sum(2) if cache.method.scores else None
            qpos = layer.query_positions(b)
            valid = cache.new_token_mask(b, nq, query.device)
            for r, row in enumerate(layer.rows[:b]):
                if grouped is not None:
                    row.observe(grouped[r][:, valid[r], : layer.row_m[r]], qpos[r][valid[r]])
                row.compact()
    return out.transpose(1, 2).contiguous(), None


# The cache `kv_attention` reads: transformers calls the attention function without it, so
# `use_kv_cache` binds it for the duration of its block (a ContextVar, so threads don't share it).
_ACTIVE_CACHE: contextvars.ContextVar["KVCache | None"] = contextvars.ContextVar("modelpress_kv_cache",
                                                                             default=None)


def check_supported(model) -> None:
    from ..models.arch import Arch

    arch = Arch(model)
    attn = [sb for sb in arch.subblocks() if sb.kind == "attn"]
    if not attn or not hasattr(getattr(arch.blocks[0], attn[0].attr), "layer_idx"):
        raise UnsupportedArchitectureError(f"{type(model).__name__}: KV-cache compression needs attention modules "
                                           "with a layer_idx (Llama, Qwen, Mistral, ... in transformers >= 5)")
    if not hasattr(model, "set_attn_implementation"):
        raise UnsupportedArchitectureError("this model cannot switch its attention implementation")


@contextlib.contextmanager
def use_kv_cache(model, cache: KVCache) -> Iterator[KVCache]:
    """Run `model` with `cache` as its compressed KV cache (pass it as past_key_values / cache).
    The attention implementation and the attention-mask hook are restored on exit."""
    from transformers import AttentionInterface

    check_supported(model)
    if ATTN_NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTN_NAME, kv_attention)
    previous = model.config._attn_implementation

    def grab_mask(mod, args, kwargs):
        am = kwargs.get("attention_mask")
        cache.pad_mask = am.bool() if am is not None and am.dim() == 2 else None

    handle = model.register_forward_pre_hook(grab_mask, with_kwargs=True)
    try:
        model.set_attn_implementation(ATTN_NAME)
        token = _ACTIVE_CACHE.set(cache)
        try:
            yield cache
        finally:
            _ACTIVE_CACHE.reset(token)
    finally:
        handle.remove()
        model.set_attn_implementation(previous)


def make_cache(model, method: str | KVMethod, **settings) -> KVCache:
    if isinstance(method, str):
        method = KV_METHODS.build(method, **settings)
    elif settings:
        raise ConfigError("settings given with a method object")
    n = model.config.get_text_config(decoder=True).num_hidden_layers
    return KVCache(method, n)
