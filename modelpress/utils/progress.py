"""Progress of long work: off in library use (logging only), switched on by the CLI.

Two ways to show it. On a terminal, tqdm bars. Anywhere else (`make demo | tee log`, a batch
job, CI) a bar would print nothing readable, so each bar becomes log lines on the
`modelpress.progress` logger: one at most every `LINE_SECONDS` while it runs (count, elapsed,
time left, the bar's postfix) and one when it ends; a bar done within `QUIET_SECONDS` says nothing.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")

log = logging.getLogger("modelpress.progress")

MODES = ("off", "bars", "lines")
LINE_SECONDS = 30.0  # a running bar logs a line at most this often in "lines" mode
QUIET_SECONDS = 2.0  # ... and nothing at all when it finishes sooner

_mode = {"1": "bars", "bars": "bars", "lines": "lines"}.get(os.environ.get("MODELPRESS_PROGRESS", ""), "off")


class _Stderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (a test runner swaps it per command)."""

    def __init__(self):
        super().__init__()
        self.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))

    @property
    def stream(self):
        import sys

        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def enable_progress(on: bool | str = True) -> None:
    """True/"bars": tqdm bars; "lines": timestamped lines on stderr (through `log`, whatever the
    logging level of the rest); False/"off": nothing."""
    global _mode
    mode = ("bars" if on else "off") if isinstance(on, bool) else on
    if mode not in MODES:
        raise ValueError(f"progress mode must be one of {', '.join(MODES)}, got {on!r}")
    _mode = mode
    if mode == "lines" and not any(isinstance(h, _Stderr) for h in log.handlers):
        log.addHandler(_Stderr())
        log.setLevel(logging.INFO)
        log.propagate = False


def progress_enabled() -> bool:
    return _mode != "off"


def _duration(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class _Lines:
    """A bar that reports through `log`: at most every LINE_SECONDS, and at the end."""

    def __init__(self, total: int | None, desc: str, initial: int = 0):
        self.total, self.desc, self.n = total, desc or "working", initial
        self.t0 = self.last = time.monotonic()
        self.start_n = initial
        self.postfix = ""

    def _line(self, what: str) -> None:
        elapsed = time.monotonic() - self.t0
        parts = [f"{self.n}/{self.total}" if self.total else f"{self.n}", f"{_duration(elapsed)} elapsed"]
        done = self.n - self.start_n
        if self.total and 0 < done and self.n < self.total:
            parts.append(f"~{_duration(elapsed / done * (self.total - self.n))} left")
        log.info("%s: %s%s%s", self.desc, what, ", ".join(parts), f" ({self.postfix})" if self.postfix else "")

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= LINE_SECONDS and (not self.total or self.n < self.total):
            self.last = now
            self._line("")

    def set_postfix(self, **kw) -> None:
        self.postfix = ", ".join(f"{k} {v}" for k, v in kw.items())

    def close(self) -> None:
        if time.monotonic() - self.t0 >= QUIET_SECONDS:
            self._line("done, ")


def progress(it: Iterable[T], desc: str = "", total: int | None = None, leave: bool = False) -> Iterator[T]:
    """Wrap an iterable in a bar (or log lines) when progress is on, else return it unchanged."""
    if _mode == "off":
        return iter(it)
    if _mode == "bars":
        from tqdm.auto import tqdm

        return iter(tqdm(it, desc=desc, total=total, leave=leave, dynamic_ncols=True))
    if total is None and hasattr(it, "__len__"):
        total = len(it)  # type: ignore[arg-type]
    return _lines_iter(it, desc, total)


def _lines_iter(it: Iterable[T], desc: str, total: int | None) -> Iterator[T]:
    bar = _Lines(total, desc)
    try:
        for x in it:
            yield x
            bar.update(1)
    finally:
        bar.close()


class Bar:
    """A manual bar (update / set_postfix) that is a no-op when progress is off."""

    def __init__(self, total: int, desc: str = "", initial: int = 0):
        self._bar = None
        if _mode == "bars":
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, initial=initial, dynamic_ncols=True, leave=False)
        elif _mode == "lines":
            self._bar = _Lines(total, desc, initial)

    def update(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def set_postfix(self, **kw) -> None:
        if self._bar is not None:
            self._bar.set_postfix(**kw)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> "Bar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
