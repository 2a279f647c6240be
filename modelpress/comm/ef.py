"""Error feedback, written once and combined with any compressor.

Per tensor and worker, with C the compressor, ĉ what this worker's message decodes to, and c̄ the
average of all workers' decoded messages:
- none:     send C(g);                       step with c̄
- ef:       send C(g + e); e ← g + e − ĉ;    step with c̄            (classic error feedback)
- ef21:     send C(g − h_i); h_i ← h_i + ĉ;  h ← h + c̄; step with h  (Richtárik et al., 2021)
- econtrol: send C(η·e + g − h_i); e ← e + g − h_i − ĉ; h_i ← h_i + ĉ; h ← h + c̄; step with h
            (Gao, Islamov & Stich, 2023: η controls the strength of the feedback; η = 0 is EF21. The
            theory wants η of the order of the compressor's δ (k/d for Top-K): measured on bench/comm.py
            with Top-K 1%, η = 0.03 beats EF and EF21, η = 0.5 stops learning.)
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from ..errors import ConfigError
from ..registry import Registry

ERROR_FEEDBACK: Registry = Registry("error feedback")


class ErrorFeedback:
    registered_name: ClassVar[str]

    def prepare(self, g: torch.Tensor, mem: dict) -> torch.Tensor:
        """What to compress."""
        raise NotImplementedError

    def finish(self, g: torch.Tensor, x: torch.Tensor, mem: dict, local: torch.Tensor, avg: torch.Tensor) -> torch.Tensor:
        """Update the memory; return the step direction."""
        raise NotImplementedError


def _get(mem: dict, key: str, like: torch.Tensor) -> torch.Tensor:
    if key not in mem:
        mem[key] = torch.zeros_like(like)
    return mem[key]


@ERROR_FEEDBACK.register("none")
@dataclasses.dataclass
class NoFeedback(ErrorFeedback):
    def prepare(self, g, mem):
        return g

    def finish(self, g, x, mem, local, avg):
        return avg


@ERROR_FEEDBACK.register("ef")
@dataclasses.dataclass
class EF(ErrorFeedback):
    def prepare(self, g, mem):
        return g + _get(mem, "e", g)

    def finish(self, g, x, mem, local, avg):
        mem["e"] = x - local
        return avg


@ERROR_FEEDBACK.register("ef21")
@dataclasses.dataclass
class EF21(ErrorFeedback):
    def prepare(self, g, mem):
        return g - _get(mem, "h_local", g)

    def finish(self, g, x, mem, local, avg):
        mem["h_local"] = mem["h_local"] + local
        mem["h"] = _get(mem, "h", g) + avg
        return mem["h"]


@ERROR_FEEDBACK.register("econtrol")
@dataclasses.dataclass
class EControl(ErrorFeedback):
    eta: float = 0.03

    def __post_init__(self):
        if self.eta < 0:
            raise ConfigError("econtrol eta must be >= 0")

    def prepare(self, g, mem):
        return self.eta * _get(mem, "e", g) + g - _get(mem, "h_local", g)

    def finish(self, g, x, mem, local, avg):
        mem["e"] = mem["e"] + g - mem["h_local"] - local
        mem["h_local"] = mem["h_local"] + local
        mem["h"] = _get(mem, "h", g) + avg
        return mem["h"]
