"""Calibration text sampled from the model itself (data-free calibration).

A model's own samples are a sample of the distribution it was trained on, so operators calibrated
on them are not pulled towards one narrow domain, and a KL fitness measured on them weighs the
model's behaviour where the model actually puts probability. Each window is plain temperature
sampling (no top-k / top-p) of `seq_len` tokens. Starts vary: windows alternate between the bare
BOS token (a uniformly random first token for a tokenizer without BOS and EOS) and, when the tokenizer has a chat template, the opening of a user turn, so instruct
models also produce chat-formatted turns. An end-of-turn or end-of-text token is kept and sampling
goes on after it (an instruct model then opens the next turn), so every window is full.

Sampling runs on a copy of a float32 model cast to the compute dtype (utils.device: bfloat16
where the device does it fast); that dtype is part of the cache key.
Samples are generated in fixed batches of `BATCH` windows, batch b seeded with (seed, b): asking
for 32 windows gives the first 32 of the 128-window set. They are cached on disk keyed by the
model's weights fingerprint, so a second run (or a second command) reuses them.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
from pathlib import Path

import torch

from ..errors import DataError
from ..models.arch import cache_kwarg
from ..utils.device import forward_dtype
from ..utils.io import atomic_file, cache_root
from ..utils.progress import progress

log = logging.getLogger(__name__)

BATCH = 32  # windows generated together; fixed so a window's tokens do not depend on how many are asked for
VERSION = 2  # bump when the sampling procedure changes: old caches are then not reused


def model_fingerprint(model) -> str:
    """A short hash of the model's config and a few values of every parameter (cheap, and two
    different checkpoints of one architecture get different fingerprints)."""
    h = hashlib.sha256()
    h.update(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.detach().reshape(-1)
            idx = torch.arange(0, flat.numel(), max(1, flat.numel() // 64))[:64]
            h.update(name.encode())
            h.update(str(tuple(p.shape)).encode())
            h.update(flat[idx].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _starts(tokenizer) -> list[list[int]]:
    """The prompts windows start from: BOS alone, and a user turn's opening in the chat template."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    starts = [[bos] if bos is not None else []]  # [] = a first token drawn uniformly from the vocabulary
    if getattr(tokenizer, "chat_template", None):
        try:
            text = tokenizer.apply_chat_template([{"role": "user", "content": "\x00"}], tokenize=False)
        except Exception:  # a template that needs other roles or fields: plain starts only
            text = None
        if text and "\x00" in text:
            prefix = text.split("\x00")[0]
            ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
            if ids:
                starts.append(list(ids))
    return starts


@torch.no_grad()
def _generate_batch(model, starts: list[list[int]], seq_len: int, generator: torch.Generator,
                    temperature: float) -> torch.Tensor:
    """`len(starts)` windows of exactly `seq_len` tokens, each beginning with its start prompt."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    n = len(starts)
    out = torch.zeros(n, seq_len, dtype=torch.long)
    lens = [min(len(s), seq_len) for s in starts]
    for r, s in enumerate(starts):
        out[r, :lens[r]] = torch.tensor(s[:seq_len])
    # Left-pad the prompts to one length; padded positions are masked out of attention.
    p = max(lens)
    ids = torch.zeros(n, p, dtype=torch.long)
    mask = torch.zeros(n, p, dtype=torch.long)
    for r in range(n):
        ids[r, p - lens[r]:] = out[r, :lens[r]]
        mask[r, p - lens[r]:] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    kv = {cache_kwarg(model): DynamicCache()}
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
                   use_cache=True, **kv).logits[:, -1].float()
    filled = list(lens)
    cur_pos = pos[:, -1]
    for _ in progress(range(seq_len - min(lens)), desc="self-generated text", leave=False):
        probs = torch.softmax(logits / temperature, dim=-1).cpu()
        nxt = torch.multinomial(probs, 1, generator=generator)[:, 0]
        for r in range(n):
            if filled[r] < seq_len:
                out[r, filled[r]] = nxt[r]
                filled[r] += 1
        if min(filled) >= seq_len:
            break
        mask = torch.cat([mask, torch.ones(n, 1, dtype=torch.long)], dim=1)
        cur_pos = cur_pos + 1
        logits = model(input_ids=nxt[:, None].to(device), attention_mask=mask.to(device),
                       position_ids=cur_pos[:, None].to(device), use_cache=True, **kv).logits[:, -1].float()
    return out


def self_windows(model, tokenizer, n: int, seq_len: int, seed: int = 0, temperature: float = 1.0,
                 cache_dir: str | Path | None = None) -> torch.Tensor:
    """`n` windows of `seq_len` tokens sampled from `model` (cached on disk)."""
    if model is None:
        raise DataError("--data self samples text from the model: pass the model (get_windows(..., model=m))")
    if tokenizer is None:
        raise DataError("--data self needs the model's tokenizer")
    if temperature <= 0:
        raise DataError("self-generated text needs a temperature > 0")
    folder = Path(cache_dir) if cache_dir is not None else cache_root() / "selfgen"
    param = next(model.parameters())
    dtype = forward_dtype(param)
    key = hashlib.sha256(json.dumps([VERSION, model_fingerprint(model), seq_len, seed, temperature, BATCH,
                                     str(dtype)]).encode())
    path = folder / f"{key.hexdigest()[:20]}.pt"
    have = torch.zeros(0, seq_len, dtype=torch.long)
    if path.is_file():
        try:
            have = torch.load(path, weights_only=True)
            if have.dim() != 2 or have.shape[1] != seq_len or have.dtype != torch.long:
                raise ValueError(f"shape {tuple(have.shape)}")
        except Exception as e:  # a damaged cache file is regenerated, never trusted
            log.warning("self-generated text cache %s is unreadable (%s); generating it again", path, e)
            have = torch.zeros(0, seq_len, dtype=torch.long)
    if len(have) >= n:
        return have[:n].clone()
    starts = _starts(tokenizer)
    vocab = model.get_output_embeddings().weight.shape[0]
    was_training = model.training
    sampler = copy.deepcopy(model).to(dtype) if dtype != param.dtype else model
    sampler.eval()
    batches = [have]
    try:
        for b in range(len(have) // BATCH, -(-n // BATCH)):
            g = torch.Generator().manual_seed(seed * 1_000_003 + b)
            rows = [starts[(b * BATCH + r) % len(starts)] or
                    [int(torch.randint(vocab, (1,), generator=g))] for r in range(BATCH)]
            log.info("sampling calibration text from the model (%s): windows %d-%d of %d", dtype, b * BATCH,
                     (b + 1) * BATCH, n)
            batches.append(_generate_batch(sampler, rows, seq_len, g, temperature))
    finally:
        model.train(was_training)
        del sampler
    # batches after the cached part start at a batch boundary: drop a cached partial batch's tail first
    have = batches[0][: (len(batches[0]) // BATCH) * BATCH]
    allw = torch.cat([have, *batches[1:]])
    with atomic_file(path, "wb") as f:
        torch.save(allw, f)
    return allw[:n].clone()
