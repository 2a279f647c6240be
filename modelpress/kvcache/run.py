"""Evaluating and generating with a compressed cache."""
from __future__ import annotations

import contextlib
import math
import time

import torch
import torch.nn.functional as F

from ..utils.progress import progress
from ..models.arch import cache_kwarg
from ..utils.device import forwards, takes_compute_dtype
from .base import KVCache, KVMethod, make_cache, use_kv_cache


@contextlib.contextmanager
def kv_session(model, method: str | KVMethod, **settings):
    """`with kv_session(model, "kivi", bits=4) as cache: model.generate(..., past_key_values=cache)`."""
    cache = make_cache(model, method, **settings)
    with use_kv_cache(model, cache):
        yield cache


@takes_compute_dtype
@torch.no_grad()
def kv_evaluate(model, ids: torch.Tensor, method: str | KVMethod, *, prefill: int = 256, step: int = 1,
                batch_size: int = 4, reference=None, desc: str = "kv eval", **settings) -> dict:
    """Teacher-forced perplexity with the compressed cache built incrementally as in generation:
    the first `prefill` tokens of each window are processed at once (the prompt), then the rest
    `step` tokens at a time (1 = exactly token-by-token decoding). Perplexity, and KL to
    `reference` logits if given (a dict window index -> logits from a full-cache run), count only
    the decoded tokens. Reports the compressed cache's exact bytes at the end of each window."""
    dev = next(model.parameters()).device
    nll, n_tok, kl_sum = 0.0, 0, 0.0
    nbytes, full = 0, 0
    t_decode, n_decode = 0.0, 0
    logits_out = {}
    for s in progress(range(0, len(ids), batch_size), desc=desc):
        batch = ids[s:s + batch_size].to(dev)
        b, L = batch.shape
        cache = make_cache(model, method, **settings) if isinstance(method, str) else make_cache(model, method)
        with use_kv_cache(model, cache), forwards(model):
            ck = {cache_kwarg(model): cache}
            out = model(input_ids=batch[:, :prefill], use_cache=True, **ck)
            last = out.logits[:, -1:]
            pieces = [last]
            t0 = time.time()
            for t in range(prefill, L - 1, step):
                chunk = batch[:, t:min(t + step, L - 1)]
                out = model(input_ids=chunk, use_cache=True, **ck)
                pieces.append(out.logits)
                n_decode += chunk.shape[1] * b
            t_decode += time.time() - t0
        logits = torch.cat(pieces, 1)[:, : L - prefill].float()  # predictions for tokens prefill..L-1
        lp = F.log_softmax(logits, -1)
        tgt = batch[:, prefill:]
        nll += -float(lp.gather(-1, tgt.unsqueeze(-1)).sum())
        n_tok += tgt.numel()
        if reference is not None:
            ref = reference[s].to(lp.device)
            kl_sum += float((ref.exp() * (ref - lp)).sum())
        logits_out[s] = lp.half().cpu()
        nbytes += cache.nbytes()
        full += cache.full_nbytes()
    return {"ppl": math.exp(nll / n_tok), "nll": nll / n_tok, "kl": kl_sum / n_tok if reference is not None else None,
            "cache_bytes": nbytes, "full_bytes": full, "ratio": full / max(nbytes, 1),
            "tokens_per_s": n_decode / max(t_decode, 1e-9), "n_tokens": n_tok, "logprobs": logits_out}


@takes_compute_dtype
@torch.no_grad()
def kv_generate(model, input_ids: torch.Tensor, method: str | KVMethod, *, attention_mask=None,
                max_new_tokens: int = 32, **settings) -> tuple[torch.Tensor, KVCache]:
    """Greedy generation with the compressed cache; returns (sequences, cache)."""
    cache = make_cache(model, method, **settings) if isinstance(method, str) else make_cache(model, method)
    with use_kv_cache(model, cache), forwards(model):
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=0, **{cache_kwarg(model): cache})
    return out, cache
