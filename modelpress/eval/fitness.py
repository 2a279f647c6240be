"""Whole-model fitness for the evolutionary search: KL(dense ‖ candidate) on calibration tokens.

Forwards run in the compute dtype (utils.device); log-softmax and KL in float32. The dense
model's next-token distributions are computed once and kept as top-K log-probabilities (float32)
plus the remaining tail mass (K >= 512; K = vocab size gives the exact KL). A candidate's KL is
computed over the K + 1 buckets (top-K tokens of the reference, and "everything else").

Validation: `validation` windows (disjoint from the fitness windows, same source) are scored only
by `validate`, never by selection, so a search can report whether what it gains on its own samples
holds on text it never selected on.

Fast path: candidates differ from their parent in a few units. The parent's hidden states at the
input of every block are cached per token sample; a candidate whose first changed unit sits in
block i restarts from the parent's state at block i instead of running blocks 0..i-1 again.

A streamed model (models.streamed) is scored with block-streamed forwards: each block is read from
disk when the forward reaches it and the candidate's levels are put into it then.
"""
from __future__ import annotations

import hashlib
import logging
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..allocate.base import Fitness
from ..models.arch import Arch
from ..models.streamed import block_forwards
from ..utils.device import forwards
from ..utils.progress import progress

log = logging.getLogger(__name__)


class _Passthrough(nn.Module):
    def forward(self, hidden_states=None, *args, **kwargs):
        return hidden_states if hidden_states is not None else kwargs["hidden_states"]


def _hidden_arg(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


class KLFitness(Fitness):
    def __init__(self, model, state, problem, ids: torch.Tensor, *, topk: int = 512, batch_size: int = 4,
                 reuse_prefix: bool = True, reference: list | None = None, validation: torch.Tensor | None = None):
        self.model = model
        self.state = state
        self.problem = problem
        self.values = problem.extra["values"]
        self.unit_block = problem.extra["block"]
        self.n_fit = len(ids)  # samples are drawn from these windows; the validation windows follow them
        self.validation = tuple(range(len(ids), len(ids) + (0 if validation is None else len(validation))))
        ids = ids if validation is None else torch.cat([ids, validation.to(ids.dtype)])
        self.ids = ids
        self.seq_len = ids.shape[1]
        self._validated: dict[tuple, float] = {}
        self.first_validation: float | None = None  # the first plan validated: a search's start
        self.batch_size = batch_size
        self.reuse_prefix = reuse_prefix
        self.arch = Arch(model)
        self.device = next(model.parameters()).device
        vocab = model.config.vocab_size
        self.topk = min(max(topk, 1), vocab)
        self._states_key = None
        self._states: dict[int, list[torch.Tensor]] = {}
        self._parent_scores: dict = {}
        self.evaluations = 0
        self.blocks_run = 0
        self.seconds = 0.0
        state.restore()
        self.ref: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        if reference is not None:  # computed earlier for the same dense model, windows and K
            if len(reference) != len(ids) or reference[0][0].shape[-1] != self.topk:
                raise ValueError("reference top-K cache does not match these windows")
            self.ref = reference
            return
        with torch.no_grad():
            for s in progress(range(len(ids)), desc="reference top-K"):
                lp = F.log_softmax(self._logits(ids[s:s + 1])[:, :-1].float(), dim=-1)
                top, idx = torch.topk(lp, self.topk, dim=-1)
                tail = torch.log1p(-top.exp().sum(-1).clamp(max=1 - 1e-7))
                self.ref.append((idx[0].to(torch.int32).cpu(), top[0].float().cpu(), tail[0].float().cpu()))

    def digest(self) -> str:
        h = hashlib.sha256(self.ids.numpy().tobytes())
        h.update(f"{self.n_fit}:{self.topk}".encode())
        return h.hexdigest()[:16]

    # ---- samples ---------------------------------------------------------------------------
    def new_sample(self, n_tokens: int, rng: np.random.Generator) -> tuple[int, ...]:
        n = min(self.n_fit, max(1, round(n_tokens / self.seq_len)))
        return tuple(sorted(int(i) for i in rng.choice(self.n_fit, size=n, replace=False)))

    def validate(self, choice) -> float | None:
        """KL on the validation windows (None without them); remembered per plan."""
        if not self.validation:
            return None
        key = tuple(choice)
        if key not in self._validated:
            self._validated[key] = self(choice, self.validation)
            if self.first_validation is None:
                self.first_validation = self._validated[key]
        return self._validated[key]

    # ---- running the model -----------------------------------------------------------------
    def _logits(self, ids: torch.Tensor) -> torch.Tensor:
        with forwards(self.model), block_forwards(self.model, self.device, on_load=self.state.load_levels):
            return self.model(input_ids=ids.to(self.device), use_cache=False).logits

    def _apply(self, choice) -> None:
        self.state.apply({m: self.values[i][c] for i, c in enumerate(choice) for m in self.problem.members(i)})

    def _run(self, ids: torch.Tensor, start: int = 0, start_state: torch.Tensor | None = None,
             record: list | None = None) -> torch.Tensor:
        blocks = self.arch.blocks
        saved = [blocks[j] for j in range(start)]
        handles = []
        try:
            for j in range(start):
                blocks[j] = _Passthrough()
            if start_state is not None:
                def swap(mod, args, kwargs):
                    if args:
                        return (start_state,) + tuple(args[1:]), kwargs
                    kwargs = dict(kwargs)
                    kwargs["hidden_states"] = start_state
                    return args, kwargs

                handles.append(blocks[start].register_forward_pre_hook(swap, with_kwargs=True))
            if record is not None:
                for j in range(len(blocks)):
                    handles.append(blocks[j].register_forward_pre_hook(
                        lambda mod, a, kw, j=j: record.__setitem__(j, _hidden_arg(a, kw).detach()), with_kwargs=True))
            return self._logits(ids)
        finally:
            for h in handles:
                h.remove()
            for j, b in enumerate(saved):
                blocks[j] = b

    def _kl(self, logits: torch.Tensor, windows: list[int]) -> tuple[float, int]:
        lp = F.log_softmax(logits[:, :-1].float(), dim=-1)
        total, n = 0.0, 0
        for r, w in enumerate(windows):
            idx, top, tail = (t.to(lp.device) for t in self.ref[w])
            ref_top = top.float()
            cand_top = lp[r].gather(-1, idx.long())
            kl = (ref_top.exp() * (ref_top - cand_top)).sum(-1)
            if self.topk < lp.shape[-1]:
                cand_tail = torch.log1p(-cand_top.exp().sum(-1).clamp(max=1 - 1e-7))
                kl = kl + tail.exp() * (tail - cand_tail)
            total += float(kl.sum())
            n += kl.numel()
        return total, n

    @torch.no_grad()
    def __call__(self, choice, sample, parent=None) -> float:
        t0 = time.time()
        self.evaluations += 1
        batches = [list(sample[s:s + self.batch_size]) for s in range(0, len(sample), self.batch_size)]
        nblocks = len(self.arch.blocks)
        use_prefix = self.reuse_prefix and parent is not None
        if use_prefix:
            key = (tuple(parent), tuple(sample))
            if key != self._states_key:  # run the parent once on this sample, keeping every block's input
                self._apply(parent)
                self._states, tot, n = {}, 0.0, 0
                for b, win in enumerate(batches):
                    rec: list = [None] * nblocks
                    logits = self._run(self.ids[win], record=rec)
                    self._states[b] = rec
                    t, k = self._kl(logits, win)
                    tot, n = tot + t, n + k
                self.blocks_run += nblocks * len(sample)
                self._states_key = key
                self._parent_scores = {key: tot / n}
            diff = [i for i, (a, b) in enumerate(zip(choice, parent)) if a != b]
            if not diff:
                self.seconds += time.time() - t0
                return self._parent_scores[key]
            start = min(self.unit_block[i] for i in diff)
        else:
            start = 0
        self._apply(choice)
        tot, n = 0.0, 0
        for b, win in enumerate(batches):
            st = self._states[b][start] if (use_prefix and start > 0) else None
            logits = self._run(self.ids[win], start=start if st is not None else 0, start_state=st)
            t, k = self._kl(logits, win)
            tot, n = tot + t, n + k
        self.blocks_run += (nblocks - (start if use_prefix else 0)) * len(sample)
        self.seconds += time.time() - t0
        return tot / n
