"""joint: units = Linear layers; levels = GPTQ bits x SparseGPT sparsity x EoRA rank (and
optionally "drop", the layer removed), costed in bytes; a unit keeps its Pareto-optimal levels."""
from __future__ import annotations

import dataclasses

from ...errors import ConfigError
from ...ops.base import output_error
from ...ops.packed import PackedWeight
from ..build import on_shared_inputs
from .base import KINDS, Kind, UnitInfo, pareto


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
    shrink: float = 0.1  # GPTQ's Hessian blended with its diagonal (the operator's default)
    sequential_level: str | None = None

    budgets = ("mb",)
    options = {"levels": "bits", "sparsities": "sparsity", "ranks": "ranks", "allow-drop": "allow_drop",
               "group-size": "group_size", "sequential-level": "sequential_level", "mse": "mse", "shrink": "shrink"}
    tensors_per_unit = 6
    legacy = {"sequential_level": None, "shrink": 0.0}

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

    def build(self, db, model, windows, batch_size, device) -> None:
        from ...ops import COMPENSATORS, OPERATORS
        from ...ops.lowrank.factor import eigen_root

        def levels(n, w, st, want) -> dict:
            h = st.hessian
            roots = eigen_root(h, self.damp) if any(self.ranks) else None
            new = {}
            if "drop" in want:
                new["drop"] = (PackedWeight(shape=tuple(w.shape)), 1.0)
            for b in self.bits:
                for sp in self.sparsity:
                    names_here = [self.name(b, sp, r) for r in self.ranks]
                    if not set(want).intersection(names_here):
                        continue
                    op = (OPERATORS.build("gptq", bits=b, group_size=self.group_size, damp=self.damp, mse=self.mse,
                                          shrink=self.shrink)
                          if not sp else
                          OPERATORS.build("sparsegpt", sparsity=sp, bits=b, group_size=self.group_size, damp=self.damp))
                    base = op.compress(w, st)
                    for r, v in zip(self.ranks, names_here):
                        pw = base if r == 0 else COMPENSATORS.build("eora", rank=r, damp=self.damp).apply(
                            w, base, st, roots=roots)
                        new[v] = (pw, output_error(w, pw.dequantize(), h))
            return new

        on_shared_inputs(db, model, windows, batch_size, device, self.sequential_level, levels, "database joint")
