"""Compensators add a low-rank correction B·A on top of any compressed weight."""
from __future__ import annotations

from typing import ClassVar

from ...registry import Registry

COMPENSATORS: Registry = Registry("compensator")


class Compensator:
    registered_name: ClassVar[str]
    stats: ClassVar[str] = "xtx"
