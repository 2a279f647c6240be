"""Progress bars: off in library use (logging only), switched on by the CLI."""
from __future__ import annotations

import os
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")

_enabled = os.environ.get("MODELPRESS_PROGRESS", "0") == "1"


def enable_progress(on: bool = True) -> None:
    global _enabled
    _enabled = on


def progress_enabled() -> bool:
    return _enabled


def progress(it: Iterable[T], desc: str = "", total: int | None = None, leave: bool = False) -> Iterator[T]:
    """Wrap an iterable in a tqdm bar when progress is enabled, else return it unchanged."""
    if not _enabled:
        return iter(it)
    from tqdm.auto import tqdm

    return iter(tqdm(it, desc=desc, total=total, leave=leave, dynamic_ncols=True))


class Bar:
    """A manual bar (update / set_postfix) that is a no-op when progress is off."""

    def __init__(self, total: int, desc: str = "", initial: int = 0):
        self._bar = None
        if _enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, initial=initial, dynamic_ncols=True, leave=False)

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
