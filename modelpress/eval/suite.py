"""Evaluation over several text domains: perplexity and KL per domain, and the worst ratio to dense.

`SuiteReference` runs the dense model once over every domain: its next-token log-probabilities
(kept for the KL of each candidate) and its perplexities come from the same forwards.
`evaluate_suite` scores a model on every domain; `suite_row` turns that into report columns:
`ppl:<domain>`, `ratio:<domain>` (perplexity over dense perplexity), `kl` (mean over domains,
tokens weighted), `worst_ratio` and `worst_domain`.
"""
from __future__ import annotations

from ..data.suites import EvalDomains
from .metrics import EvalResult, ReferenceLogprobs, evaluate


class SuiteReference:
    def __init__(self, model, domains: EvalDomains, batch_size: int | None = None):
        self.domains = domains
        self.logprobs = {d: ReferenceLogprobs(model, ids, batch_size=batch_size, desc=f"dense {d}")
                         for d, ids in domains.windows.items()}
        self.dense = {d: lp.result for d, lp in self.logprobs.items()}


def evaluate_suite(model, domains: EvalDomains, reference: SuiteReference | None = None, desc: str = "eval",
                   batch_size: int | None = None) -> dict[str, EvalResult]:
    return {d: evaluate(model, ids, reference=reference.logprobs[d] if reference else None,
                        batch_size=batch_size, desc=f"{desc} {d}")
            for d, ids in domains.windows.items()}


def suite_row(results: dict[str, EvalResult], dense: dict[str, EvalResult] | None = None) -> dict:
    """Report fields of one model's per-domain results (ratios when the dense results are given)."""
    row: dict = {f"ppl:{d}": r.ppl for d, r in results.items()}
    kls = [(r.kl, r.n_tokens) for r in results.values() if r.kl is not None]
    if kls:
        row["kl"] = sum(k * n for k, n in kls) / sum(n for _, n in kls)
    if dense:
        ratios = {d: r.ppl / dense[d].ppl for d, r in results.items() if d in dense}
        row.update({f"ratio:{d}": v for d, v in ratios.items()})
        worst = max(ratios, key=ratios.get)
        row.update(worst_ratio=ratios[worst], worst_domain=None if results is dense else worst)
    row["eval_tokens"] = sum(r.n_tokens for r in results.values())
    return row


def suite_columns(domains: list[str], ratios: bool = True) -> list[tuple[str, str]]:
    """Report columns for these domains: perplexity per domain, then the worst ratio and mean KL."""
    cols = [(f"ppl:{d}", f"ppl {d}") for d in domains]
    if ratios:
        cols += [("worst_ratio", "worst × dense"), ("worst_domain", "worst domain")]
    return cols + [("kl", "KL to dense")]
