"""Tokenized fixed-length windows with a deterministic calibration / evaluation split.

For a single text the token stream is cut at `1 - eval_fraction`: calibration windows come only
from the part before the cut, evaluation windows only from the part after it, so they can never
share a token; a corpus with its own held-out text (documents set aside, a dataset's test split)
gives calibration windows from its calibration text only. Evaluation windows never overlap; when
fewer are asked for than fit, they are spread evenly over the held-out text. Calibration windows
are a seeded random choice of non-overlapping windows of the calibration region (random offsets
only when more samples are asked for than fit).

Calibration sources beyond one corpus:
- `self`: text sampled from the model itself (`selfgen`), which needs the model;
- `A+B+...`: a mixture, equal shares of the windows from each part (each part drawn as if alone,
  with its own seed); `A:0.7+B:0.3` gives shares explicitly;
- `mix` is the named mixture `MIXES["mix"]`, built from offline corpora that are not evaluation
  domains of the default suite (`suites.py`), so default evaluation is out of domain but for pydoc.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging

import torch

from ..errors import DataError
from ..utils.io import atomic_file, cache_root
from .corpora import get_corpus, known_corpus
from .defaults import DEFAULT_CALIBRATION

log = logging.getLogger(__name__)

# Named mixtures: part -> share of the calibration windows.
MIXES: dict[str, dict[str, float]] = {
    "mix": {"pydoc": 0.5, "sotu": 0.5},
    "prose": {"sotu": 1.0, "wiki": 1.0, "mobydick": 1.0},
}


@dataclasses.dataclass
class DataConfig:
    corpus: str = DEFAULT_CALIBRATION  # calibration source: a corpus, a path, `self`, a mixture (`mix`, `a+b`)
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
        if self.n_eval is not None and self.n_eval < 1:
            raise DataError("n_eval must be at least 1")
        for part in parse_source(self.corpus):  # an unknown name fails here, before any long work
            if part != "self":
                known_corpus(part)


@dataclasses.dataclass
class Windows:
    calib: torch.Tensor  # (n_samples, seq_len) int64
    eval: torch.Tensor  # (n_eval, seq_len) int64: held-out windows of the calibration corpus (pydoc for self/mix)
    # (stream, start) of every window, stream 0 = calibration text, 1 = held-out text (same as 0 when
    # split); for a mixture, (part index, start) with self-generated windows at start -1
    calib_starts: list[tuple[int, int]]
    eval_starts: list[tuple[int, int]]
    config: DataConfig


def _tokenizer_key(tokenizer) -> str:
    vocab = tokenizer.get_vocab()
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    h.update(repr(sorted(vocab.items())[:: max(1, len(vocab) // 4096)]).encode())
    h.update(str(len(vocab)).encode())
    return h.hexdigest()[:16]


def _tokenize(tokenizer, text: str) -> torch.Tensor:
    """Token ids of `text`; long texts are cached on disk (by tokenizer and text hash)."""
    if tokenizer is None:
        raise DataError("this model has no tokenizer; pass token windows directly")
    path = None
    if len(text) > 200_000:
        key = hashlib.sha256(text.encode("utf-8", errors="replace")).hexdigest()[:24]
        path = cache_root() / "tokens" / f"{_tokenizer_key(tokenizer)}-{key}.pt"
        if path.is_file():
            try:
                ids = torch.load(path, weights_only=True)
                if ids.dtype == torch.long and ids.dim() == 1:
                    return ids
            except Exception:  # a damaged cache entry is rebuilt
                pass
    ids = torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long)
    if path is not None:
        with atomic_file(path, "wb") as f:
            torch.save(ids, f)
    return ids


def _eval_windows(ids: torch.Tensor, L: int, n_eval: int | None, corpus: str) -> list[int]:
    avail = len(ids) // L
    if avail < 1:
        raise DataError(f"corpus {corpus!r} has too little held-out text for one window of {L} tokens")
    if n_eval is None or n_eval >= avail:
        return [k * L for k in range(avail)]
    return [(k * avail // n_eval) * L for k in range(n_eval)]


def corpus_split(tokenizer, corpus: str, seq_len: int, eval_fraction: float = 0.4):
    """(calibration ids, held-out ids, held-out stream, held-out offset) of one text corpus."""
    text, held_out = get_corpus(corpus).load()
    stream = _tokenize(tokenizer, text)
    if held_out is None:
        cut = int(len(stream) * (1 - eval_fraction))
        return stream[:cut], stream[cut:], 0, cut
    return stream, _tokenize(tokenizer, held_out), 1, 0


def eval_windows(tokenizer, corpus: str, seq_len: int, n_eval: int | None = None,
                 eval_fraction: float = 0.4) -> torch.Tensor:
    """Held-out windows of one text corpus (what `get_windows(...).eval` holds for it)."""
    _, ev_ids, _, _ = corpus_split(tokenizer, corpus, seq_len, eval_fraction)
    starts = _eval_windows(ev_ids, seq_len, n_eval, corpus)
    return torch.stack([ev_ids[s:s + seq_len] for s in starts])


def _calib_from(cal_ids: torch.Tensor, L: int, n: int, seed: int, corpus: str) -> list[int]:
    if len(cal_ids) < L:
        raise DataError(f"corpus {corpus!r} has only {len(cal_ids)} calibration tokens, fewer than seq_len={L}")
    g = torch.Generator().manual_seed(seed)
    n_fit = len(cal_ids) // L
    if n <= n_fit:
        return [k * L for k in torch.randperm(n_fit, generator=g)[:n].tolist()]
    log.warning("%d calibration windows of %d tokens requested from %r but only %d fit without overlap; "
                "sampling random (overlapping) offsets", n, L, corpus, n_fit)
    return torch.randint(0, len(cal_ids) - L + 1, (n,), generator=g).tolist()


def parse_source(source: str) -> dict[str, float]:
    """A calibration source as {part: share}: `mix` expands to its parts, `a+b` to equal shares,
    `a:0.7+b:0.3` to the given shares (normalized)."""
    parts: dict[str, float] = {}
    for item in source.split("+"):
        name, _, share = item.strip().partition(":")
        if not name:
            raise DataError(f"bad calibration source {source!r}: empty part (write e.g. mix+self)")
        try:
            w = float(share) if share else 1.0
        except ValueError:
            raise DataError(f"bad share {share!r} in {source!r}: write e.g. pydoc:0.7+self:0.3") from None
        if w <= 0:
            raise DataError(f"shares in {source!r} must be positive")
        sub = dict(MIXES[name]) if name in MIXES else {name: 1.0}
        for k, v in sub.items():
            parts[k] = parts.get(k, 0.0) + w * v / sum(sub.values())
    total = sum(parts.values())
    return {k: v / total for k, v in parts.items()}


def _shares(n: int, parts: dict[str, float]) -> list[int]:
    """Windows per part: largest remainders, every part at least one window when n allows."""
    raw = [n * w for w in parts.values()]
    counts = [int(r) for r in raw]
    for i in sorted(range(len(raw)), key=lambda i: counts[i] - raw[i])[: n - sum(counts)]:
        counts[i] += 1
    return counts


def get_windows(tokenizer, config: DataConfig | None = None, *, model=None, after: int = 0, **overrides) -> Windows:
    """Calibration and evaluation windows for `config`; `model` is needed for `self` text.

    `after=N` gives windows disjoint from those of the same config with `n_samples=N`: each part
    is drawn for its share of N + n_samples windows and its first share of N is left out (a draw's
    first windows do not depend on how many are drawn; disjoint as long as each text part holds
    that many non-overlapping windows). A search's fitness takes these: text of the calibration
    source that the levels it chooses between were not fitted to."""
    cfg = dataclasses.replace(config or DataConfig(), **overrides)
    if after < 0:
        raise ValueError(f"after must be >= 0, got {after}")
    L = cfg.seq_len
    parts = parse_source(cfg.corpus)
    text_parts = [p for p in parts if p != "self"]
    eval_corpus = text_parts[0] if text_parts else "pydoc"
    cal_ids, ev_ids, ev_stream, ev_base = corpus_split(tokenizer, eval_corpus, L, cfg.eval_fraction)
    ev_starts = _eval_windows(ev_ids, L, cfg.n_eval, eval_corpus)
    ev = torch.stack([ev_ids[s:s + L] for s in ev_starts])
    eval_starts = [(ev_stream, ev_base + s) for s in ev_starts]
    if list(parts) == [eval_corpus]:  # one corpus: exactly the windows it always had
        starts = _calib_from(cal_ids, L, after + cfg.n_samples, cfg.seed, eval_corpus)[after:]
        cal = torch.stack([cal_ids[s:s + L] for s in starts])
        return Windows(cal, ev, [(0, s) for s in starts], eval_starts, cfg)
    counts = _shares(cfg.n_samples, parts)
    skip = _shares(after, parts) if after else [0] * len(parts)
    rows, where, keys = [], [], []
    for i, (part, n, k) in enumerate(zip(parts, counts, skip)):
        if n == 0:
            continue
        if part == "self":
            from .selfgen import self_windows

            rows.append(self_windows(model, tokenizer, k + n, L, seed=cfg.seed)[k:])
            where += [(i, -1)] * n
        else:
            ids = cal_ids if part == eval_corpus else corpus_split(tokenizer, part, L, cfg.eval_fraction)[0]
            starts = _calib_from(ids, L, k + n, cfg.seed * 7919 + i, part)[k:]
            rows.append(torch.stack([ids[s:s + L] for s in starts]))
            where += [(i, s) for s in starts]
        keys += [((j + 0.5) / n, i) for j in range(n)]
    # Interleaved by share, so every prefix (the search's fitness windows, then its validation
    # windows) is a mixture in the same proportions as the whole.
    order = sorted(range(len(keys)), key=keys.__getitem__)
    log.info("calibration: %s", ", ".join(f"{n} windows of {p}" for p, n in zip(parts, counts)))
    return Windows(torch.cat(rows)[order], ev, [where[k] for k in order], eval_starts, cfg)
