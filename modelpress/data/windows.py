"""Tokenized fixed-length windows with a deterministic calibration / evaluation split.

For a single text the token stream is cut at `1 - eval_fraction`: calibration windows come only
from the part before the cut, evaluation windows only from the part after it, so they can never
share a token. Evaluation windows are consecutive and non-overlapping (standard perplexity).
Calibration windows are a seeded random choice of non-overlapping windows of the calibration
region (random offsets only when more samples are asked for than fit).
"""
from __future__ import annotations

import dataclasses
import logging

import torch

from ..errors import DataError
from .corpora import get_corpus

log = logging.getLogger(__name__)


@dataclasses.dataclass
class DataConfig:
    corpus: str = "pydoc"
    n_samples: int = 128  # calibration windows
    seq_len: int = 512
    seed: int = 0
    eval_fraction: float = 0.4  # share of a single text held out for evaluation
    n_eval: int | None = None  # cap on evaluation windows (None: all)

    def __post_init__(self) -> None:
        if self.seq_len < 2:
            raise DataError("seq_len must be at least 2")
        if self.n_samples < 1:
            raise DataError("n_samples must be at least 1")
        if not 0.0 < self.eval_fraction < 1.0:
            raise DataError("eval_fraction must be in (0, 1)")


@dataclasses.dataclass
class Windows:
    calib: torch.Tensor  # (n_samples, seq_len) int64
    eval: torch.Tensor  # (n_eval, seq_len) int64
    # (stream, start) of every window, stream 0 = calibration text, 1 = held-out text (same as 0 when split)
    calib_starts: list[tuple[int, int]]
    eval_starts: list[tuple[int, int]]
    config: DataConfig


def _tokenize(tokenizer, text: str) -> torch.Tensor:
    if tokenizer is None:
        raise DataError("this model has no tokenizer; pass token windows directly")
    # long texts: tokenize in paragraphs to stay within tokenizer limits and keep it fast
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def get_windows(tokenizer, config: DataConfig | None = None, **overrides) -> Windows:
    cfg = dataclasses.replace(config or DataConfig(), **overrides)
    text, held_out = get_corpus(cfg.corpus).load()
    L = cfg.seq_len
    stream = _tokenize(tokenizer, text)
    if held_out is None:
        cut = int(len(stream) * (1 - cfg.eval_fraction))
        cal_ids, ev_ids, ev_stream, ev_base = stream[:cut], stream[cut:], 0, cut
    else:
        cal_ids, ev_ids, ev_stream, ev_base = stream, _tokenize(tokenizer, held_out), 1, 0
    n_eval_avail = len(ev_ids) // L
    if n_eval_avail < 1:
        raise DataError(f"corpus {cfg.corpus!r} has too little held-out text for one window of {L} tokens")
    n_eval = n_eval_avail if cfg.n_eval is None else min(cfg.n_eval, n_eval_avail)
    eval_starts = [(ev_stream, ev_base + k * L) for k in range(n_eval)]
    ev = torch.stack([ev_ids[k * L:(k + 1) * L] for k in range(n_eval)])

    if len(cal_ids) < L:
        raise DataError(f"corpus {cfg.corpus!r} has only {len(cal_ids)} calibration tokens, fewer than seq_len={L}")
    g = torch.Generator().manual_seed(cfg.seed)
    n_fit = len(cal_ids) // L
    if cfg.n_samples <= n_fit:
        idx = torch.randperm(n_fit, generator=g)[: cfg.n_samples].tolist()
        starts = [k * L for k in idx]
    else:
        log.warning("%d calibration windows of %d tokens requested but only %d fit without overlap; "
                    "sampling random (overlapping) offsets", cfg.n_samples, L, n_fit)
        starts = torch.randint(0, len(cal_ids) - L + 1, (cfg.n_samples,), generator=g).tolist()
    cal = torch.stack([cal_ids[s:s + L] for s in starts])
    return Windows(cal, ev, [(0, s) for s in starts], eval_starts, cfg)
