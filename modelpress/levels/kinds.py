"""Kinds of levels: what a unit is, which levels it has, how a level is made and what it costs.

- quant:    units = Linear layers; levels = GPTQ at several bit-widths (built sequentially, per level, or
            all on the inputs of one reference level: `sequential_level`)
- sparsity: units = Linear layers; levels = SparseGPT pruning in equal *absolute* steps (the same
            number of weights per step for every layer, so moving one unit up and another down
            keeps the total exact)
- depth:    units = attention / MLP sub-blocks; levels = dropped or kept
- joint:    units = Linear layers; levels = GPTQ bits x SparseGPT sparsity x EoRA rank, in bytes
- lowrank:  units = Linear layers; levels = ranks of an activation-aware SVD (and dense), in bytes
- gguf:     units = Linear layers and the embedding; levels = llama.cpp tensor types
"""
from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

from ..errors import ConfigError
from ..registry import Registry

KINDS: Registry = Registry("kind")


@dataclasses.dataclass
class UnitInfo:
    name: str
    shape: tuple[int, int] | None  # (out, in) for Linear units
    numel: int  # weights (parameters of a sub-block for depth)
    block: int
    group: str  # unit type, e.g. "q_proj" or "attn"
    extra: dict = dataclasses.field(default_factory=dict)


class Kind:
    registered_name: ClassVar[str]
    budgets: ClassVar[tuple[str, ...]] = ("mb",)
    tensors_per_unit: ClassVar[int] = 0  # most tensors a unit stores (file-header allowance of mb budgets)
    # settings added after databases of this kind were first written, with the value that
    # reproduces the older behaviour: left out of stored settings and database keys at that value,
    # filled in when an older database is opened, so older databases keep opening as what they are
    legacy: ClassVar[dict] = {}

    def values(self, unit: UnitInfo) -> list:
        """Level values of a unit, cheapest first."""
        raise NotImplementedError

    def settings(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items()
                if not (k in self.legacy and v == self.legacy[k])}

    @classmethod
    def from_settings(cls, settings: dict) -> "Kind":
        return cls(**{**cls.legacy, **settings})

    def order(self, unit: UnitInfo, built: dict[str, dict]) -> list:
        """The unit's usable levels, cheapest first (default: all of them)."""
        return self.values(unit)


@KINDS.register("quant")
@dataclasses.dataclass
class QuantKind(Kind):
    levels: tuple[int, ...] = (2, 3, 4, 5, 6)
    group_size: int | None = 64
    sym: bool = False
    act_order: bool = True
    damp: float = 0.01
    mse: bool = True
    shrink: float = 0.1  # GPTQ's Hessian blended with its diagonal (the operator's default)
    sequential: bool = True  # each level's pass sees inputs from blocks compressed at that level
    # one pass for all levels instead: every level of a layer is computed on the inputs it sees when the
    # blocks before it are at this bit-width (the level nearest the budget), as the mixed plans will be
    sequential_level: int | None = None

    budgets = ("bits", "mb")
    tensors_per_unit = 4
    legacy = {"sequential_level": None, "shrink": 0.0}

    def __post_init__(self) -> None:
        self.levels = tuple(sorted(set(int(b) for b in self.levels)))
        if not self.levels or any(not 2 <= b <= 8 for b in self.levels):
            raise ConfigError(f"quantization levels must be bit-widths from 2 to 8, got {self.levels}")
        if self.sequential_level is not None:
            self.sequential_level = int(self.sequential_level)
            if self.sequential_level not in self.levels:
                raise ConfigError(f"sequential_level {self.sequential_level} is not one of the levels {self.levels}")

    def values(self, unit: UnitInfo) -> list:
        return list(self.levels)

    def operator(self, bits: int):
        from ..ops import OPERATORS

        return OPERATORS.build("gptq", bits=bits, group_size=self.group_size, sym=self.sym,
                               act_order=self.act_order, damp=self.damp, mse=self.mse, shrink=self.shrink)


@KINDS.register("sparsity")
@dataclasses.dataclass
class SparsityKind(Kind):
    max_sparsity: float = 0.9
    step: int | None = None  # weights per level step; default: the largest unit gets `max_levels` levels
    max_levels: int = 24
    damp: float = 0.01
    outlier_m: float = 5.0  # OWL: a weight is an outlier when its Wanda score > M x the layer mean
    refit_iters: int = 30  # SparseGPT's refit of the kept weights (0: the plain sweep)

    budgets = ("sparsity", "mb")
    tensors_per_unit = 2
    legacy = {"refit_iters": 0}

    def __post_init__(self) -> None:
        if not 0 < self.max_sparsity <= 0.95:
            raise ConfigError("max_sparsity must be in (0, 0.95]")

    def resolve_step(self, units: list[UnitInfo]) -> int:
        if self.step is None:
            biggest = max(u.numel for u in units)
            self.step = max(1, math.ceil(self.max_sparsity * biggest / (self.max_levels - 1)))
        return self.step

    def values(self, unit: UnitInfo) -> list:
        """Numbers of pruned weights, most pruned (cheapest) first."""
        k = int(self.max_sparsity * unit.numel) // self.step
        return [j * self.step for j in range(k, -1, -1)]

    def operator(self, n_prune: int):
        from ..ops import OPERATORS

        return OPERATORS.build("sparsegpt", n_prune=n_prune, damp=self.damp, refit_iters=self.refit_iters)


@KINDS.register("depth")
@dataclasses.dataclass
class DepthKind(Kind):
    budgets = ("drop", "mb")

    def values(self, unit: UnitInfo) -> list:
        return ["dropped", "kept"]


@KINDS.register("joint")
@dataclasses.dataclass
class JointKind(Kind):
    """Levels are combinations: GPTQ bits x SparseGPT sparsity x EoRA rank (and optionally "drop",
    the layer removed). All are costed in bytes; a unit keeps only its Pareto-optimal levels
    (no other level is both smaller and more accurate).

    Every level of a layer is computed from one set of input statistics: the dense model's
    (`sequential_level=None`), or, like GPTQ's sequential calibration, the inputs the layer sees
    when everything before it is compressed at `sequential_level` (say "w3", the level closest to
    the budget), in one true-sequential pass."""

    bits: tuple[int, ...] = (2, 3, 4)
    sparsity: tuple[float, ...] = (0.0, 0.5)
    ranks: tuple[int, ...] = (0, 16)
    group_size: int | None = 64
    allow_drop: bool = False
    damp: float = 0.01
    mse: bool = True  # GPTQ's clipping search (the dense-sparsity levels)
    sequential_level: str | None = None

    budgets = ("mb",)
    tensors_per_unit = 6
    legacy = {"sequential_level": None}

    def __post_init__(self) -> None:
        self.bits = tuple(int(b) for b in self.bits)
        self.sparsity = tuple(float(s) for s in self.sparsity)
        self.ranks = tuple(int(r) for r in self.ranks)
        if any(not 2 <= b <= 8 for b in self.bits) or any(not 0 <= s <= 0.95 for s in self.sparsity):
            raise ConfigError("joint levels: bits in 2..8, sparsity in 0..0.95")
        combos = [self.name(b, s, r) for b in self.bits for s in self.sparsity for r in self.ranks]
        if self.sequential_level is not None and self.sequential_level not in combos:
            raise ConfigError(f"sequential_level {self.sequential_level!r} is not one of the levels "
                              f"({', '.join(combos)})")

    @staticmethod
    def name(bits: int, sparsity: float, rank: int) -> str:
        return f"w{bits}" + (f"-s{round(100 * sparsity)}" if sparsity else "") + (f"-r{rank}" if rank else "")

    def values(self, unit: UnitInfo) -> list:
        combos = [self.name(b, s, r) for b in self.bits for s in self.sparsity for r in self.ranks]
        return (["drop"] if self.allow_drop else []) + combos

    def order(self, unit: UnitInfo, built: dict[str, dict]) -> list:
        return pareto(built)


def pareto(built: dict[str, dict]) -> list:
    """Levels no other level beats on both bytes and error, cheapest first (equal bytes: the more
    accurate one)."""
    cands = sorted((m["nbytes"], m["error"], v) for v, m in built.items())
    out: list = []
    for nbytes, err, v in cands:
        if out and nbytes == built[out[-1]]["nbytes"]:
            continue  # sorted by error within equal bytes: the first one was the best
        if not out or err < built[out[-1]]["error"]:
            out.append(v)
    return out


@KINDS.register("lowrank")
@dataclasses.dataclass
class LowRankKind(Kind):
    """Levels are ranks of an activation-aware SVD (W ≈ B·A, both float16), named "r<rank>", plus
    "dense" (the float16 weight). Each rank keeps a share (`ratios`) of the dense layer's bytes:
    rank = ratio · out·in / (out + in). Built from dense-input statistics; one eigendecomposition
    of XᵀX and one SVD per layer give every rank. Levels are Pareto-pruned like joint ones."""

    ratios: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
    dense: bool = True
    damp: float = 0.01

    budgets = ("mb",)
    tensors_per_unit = 2

    def __post_init__(self) -> None:
        self.ratios = tuple(sorted(set(float(r) for r in self.ratios)))
        if not self.ratios or any(not 0 < r < 1 for r in self.ratios):
            raise ConfigError(f"low-rank ratios are shares of the dense bytes in (0, 1), got {self.ratios}")

    def ranks(self, unit: UnitInfo) -> list[int]:
        out_f, in_f = unit.shape
        full = out_f * in_f / (out_f + in_f)
        return sorted({max(1, min(int(r * full), min(out_f, in_f))) for r in self.ratios})

    def values(self, unit: UnitInfo) -> list:
        return [f"r{r}" for r in self.ranks(unit)] + (["dense"] if self.dense else [])

    def order(self, unit: UnitInfo, built: dict[str, dict]) -> list:
        return pareto(built)


@KINDS.register("gguf")
@dataclasses.dataclass
class GGUFKind(Kind):
    """Levels are llama.cpp (GGML) tensor types, each with its exact bytes in the GGUF file. A unit
    only gets the types its row width allows (K-quants need multiples of 256 weights per row).
    The input embedding is a unit too (it is a fifth of a small model's file)."""

    types: tuple[str, ...] = ("Q2_K", "Q3_K", "Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0")
    embedding: bool = True

    budgets = ("mb",)

    def __post_init__(self) -> None:
        from ..ops import ggml

        self.types = tuple(ggml.qtype(t).name for t in self.types)

    def values(self, unit: UnitInfo) -> list:
        from ..ops import ggml

        ok = [t for t in self.types if ggml.supported(ggml.qtype(t), unit.shape[1])]
        if not ok:
            raise ConfigError(f"none of the GGML types {self.types} can store {unit.name} "
                              f"(rows of {unit.shape[1]} weights)")
        return sorted(ok, key=lambda t: (ggml.bytes_per_row(ggml.qtype(t), unit.shape[1]), t))

    def order(self, unit: UnitInfo, built: dict[str, dict]) -> list:
        return pareto(built)
