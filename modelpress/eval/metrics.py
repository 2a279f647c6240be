"""Perplexity and KL divergence of next-token distributions, batched and without gradients."""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from ..utils.device import forwards
from ..utils.progress import progress


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def auto_batch_size(model: torch.nn.Module, seq_len: int, budget_bytes: int = 1 << 29) -> int:
    vocab = getattr(model.config, "vocab_size", 32000)
    return max(1, budget_bytes // (seq_len * vocab * 4 * 2))


def _nll(lp: torch.Tensor, batch: torch.Tensor) -> float:
    """Summed negative log-likelihood of `batch`'s next tokens under log-probabilities `lp`."""
    return -lp.gather(-1, batch[:, 1:].to(lp.device).unsqueeze(-1)).sum().item()


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with forwards(model):  # the compute dtype; log-softmax and the sums below stay float32
        out = model(input_ids=ids.to(model_device(model)), use_cache=False)
    return out.logits.float()


class ReferenceLogprobs:
    """The reference model's next-token log-probabilities on fixed windows, computed once (float16).

    Lets many compressed candidates be compared to one reference without re-running it. The same
    forwards give the reference model's own result (`result`: perplexity, KL 0), so it need not be
    evaluated again.
    """

    def __init__(self, model, ids: torch.Tensor, batch_size: int | None = None, desc: str = "reference"):
        self.ids = ids
        self.batch_size = batch_size or auto_batch_size(model, ids.shape[1])
        self.batches: list[torch.Tensor] = []
        nll_sum, n = 0.0, 0
        with torch.no_grad():
            for s in progress(range(0, len(ids), self.batch_size), desc=desc):
                batch = ids[s:s + self.batch_size]
                lp = F.log_softmax(_logits(model, batch)[:, :-1], dim=-1)
                nll_sum += _nll(lp, batch)
                n += lp.shape[0] * lp.shape[1]
                self.batches.append(lp.to(torch.float16).cpu())
        nll = nll_sum / n
        self.result = EvalResult(ppl=math.exp(nll), nll=nll, kl=0.0, n_tokens=n)


@dataclasses.dataclass
class EvalResult:
    ppl: float
    nll: float
    kl: float | None
    n_tokens: int

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@torch.no_grad()
def evaluate(model, ids: torch.Tensor, reference=None, batch_size: int | None = None, desc: str = "eval") -> EvalResult:
    """Perplexity of `model` on windows `ids` and, with a reference (model or ReferenceLogprobs),
    the mean per-token KL(reference || model)."""
    was_training = model.training
    model.eval()
    if isinstance(reference, ReferenceLogprobs):
        if not torch.equal(reference.ids, ids):
            raise ValueError("ReferenceLogprobs was computed on other windows")
        bs = reference.batch_size
    else:
        bs = batch_size or auto_batch_size(model, ids.shape[1])
    nll_sum, kl_sum, n = 0.0, 0.0, 0
    for bi, s in enumerate(progress(range(0, len(ids), bs), desc=desc)):
        batch = ids[s:s + bs]
        lp = F.log_softmax(_logits(model, batch)[:, :-1], dim=-1)
        nll_sum += _nll(lp, batch)
        n += lp.shape[0] * lp.shape[1]
        if reference is not None:
            if isinstance(reference, ReferenceLogprobs):
                ref = reference.batches[bi].to(lp.device).float()
            else:
                ref = F.log_softmax(_logits(reference, batch)[:, :-1], dim=-1).to(lp.device)
            kl_sum += (ref.exp() * (ref - lp)).sum().item()
    model.train(was_training)
    nll = nll_sum / n
    return EvalResult(ppl=math.exp(nll), nll=nll, kl=(kl_sum / n) if reference is not None else None, n_tokens=n)


def perplexity(model, ids: torch.Tensor, batch_size: int | None = None) -> float:
    return evaluate(model, ids, batch_size=batch_size).ppl


def kl_divergence(reference, model, ids: torch.Tensor, batch_size: int | None = None) -> float:
    r = evaluate(model, ids, reference=reference, batch_size=batch_size)
    assert r.kl is not None
    return r.kl
