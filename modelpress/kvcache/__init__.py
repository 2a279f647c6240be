"""Compressed KV caches for generation. Importing registers every method (nothing is patched)."""
from . import channel, evict, full, gear, quant, zipcache  # noqa: F401
from .base import KV_METHODS, KVCache, KVMethod, make_cache, use_kv_cache
from .channel import fit_bases
from .run import kv_evaluate, kv_generate, kv_session

__all__ = ["KV_METHODS", "KVCache", "KVMethod", "fit_bases", "kv_evaluate", "kv_generate", "kv_session",
           "make_cache", "use_kv_cache"]
