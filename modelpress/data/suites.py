"""Named evaluation suites: the text domains every evaluation reports, each from its corpus's
held-out split.

A compressed model is judged on text its calibration never saw, so the default suite spans three
kinds of text: held-out `pydoc` (technical writing), `austen` (fiction) and `chitchat` (casual
conversation). The default calibration (`mix`, `self`, see windows.py) contains no text of the
last two, so they measure how compression holds out of domain. A domain whose package cannot be
fetched on this machine is skipped with a warning, and reports say which ones were.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from ..errors import DataError
from .corpora import CORPORA
from .defaults import DEFAULT_SUITE, N_EVAL
from .windows import eval_windows

log = logging.getLogger(__name__)

SUITES: dict[str, tuple[str, ...]] = {
    "default": ("pydoc", "austen", "chitchat"),
    "all": ("pydoc", "austen", "chitchat", "sotu", "wiki", "mobydick"),
}


@dataclasses.dataclass
class EvalDomains:
    """Held-out windows per domain, and the domains that could not be loaded (name -> reason)."""

    windows: dict[str, torch.Tensor]
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return list(self.windows)

    def info(self, suite) -> dict:
        """What a report says of its evaluation."""
        return {"suite": suite, "domains": self.names, "skipped": self.skipped,
                "windows_per_domain": {d: len(w) for d, w in self.windows.items()},
                "seq_len": next(iter(self.windows.values())).shape[1]}


def suite_names(suite: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """The domains of a suite: a suite name, or a comma-separated list of corpora / paths."""
    if isinstance(suite, (list, tuple)):
        names = tuple(suite)
    elif suite in SUITES:
        names = SUITES[suite]
    else:
        names = tuple(s.strip() for s in suite.split(",") if s.strip())
    if not names:
        raise DataError(f"evaluation suite {suite!r} names no domain; use one of {', '.join(SUITES)} "
                        "or a comma-separated list of corpora")
    return names


def suite_windows(tokenizer, suite: str | list[str] | tuple[str, ...] = DEFAULT_SUITE, *, seq_len: int = 512,
                  n_eval: int | None = N_EVAL) -> EvalDomains:
    """Up to `n_eval` held-out windows of every domain of `suite` (spread over its held-out text)."""
    if n_eval is not None and n_eval < 1:
        raise DataError(f"n_eval must be at least 1, got {n_eval}")
    if seq_len < 2:
        raise DataError(f"seq_len must be at least 2, got {seq_len}")
    windows, skipped = {}, {}
    names = suite_names(suite)
    for name in names:
        label = Path(name).stem if name not in CORPORA and Path(name).exists() else name  # a file: its name
        try:
            windows[label] = eval_windows(tokenizer, name, seq_len, n_eval)
        except DataError as e:
            if len(names) == 1:
                raise
            skipped[label] = str(e)
            log.warning("evaluation domain %r skipped: %s", name, e)
    if not windows:
        raise DataError("no evaluation domain could be loaded: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    return EvalDomains(windows, skipped)
