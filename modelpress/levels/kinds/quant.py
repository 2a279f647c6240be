"""quant: units = Linear layers; levels = GPTQ at several bit-widths, costed in nominal bits (or bytes).

Built one sequential pass per level (each level's pass sees the inputs of blocks compressed at
that level), or with `sequential_level` every level in one pass on the inputs a layer sees when
the blocks before it hold that level (the level nearest the budget), as the mixed plans will be.
"""
from __future__ import annotations

import dataclasses
import logging

from ...calib.driver import calibrate, kept_weights
from ...errors import BudgetError, ConfigError
from ...models.arch import Arch, get_weight, set_weight
from ...ops.base import output_error
from ..build import on_shared_inputs
from .base import KINDS, Kind

log = logging.getLogger(__name__)


# what a serving engine runs fast: the bit-widths of its weight-only kernels and the layers it fuses
SERVE = {"vllm": {"levels": {4, 8}, "fused": (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))}}


@KINDS.register("quant")
@dataclasses.dataclass
class QuantKind(Kind):
    levels: tuple[int, ...] = (2, 3, 4, 5, 6)
    group_size: int | None = 64
    sym: bool = False
    act_order: bool = True
    static_groups: bool = False  # act-order with groups in column order (exportable to compressed-tensors)
    damp: float = 0.01
    mse: bool = True
    shrink: float = 0.1  # GPTQ's Hessian blended with its diagonal (the operator's default)
    sequential: bool = True  # each level's pass sees inputs from blocks compressed at that level
    # one pass for all levels instead: every level of a layer is computed on the inputs it sees when the
    # blocks before it are at this bit-width (the level nearest the budget), as the mixed plans will be
    sequential_level: int | None = None
    # "vllm": plans vLLM runs on its fast kernels: q/k/v and gate/up of a block tied to one level
    # (vLLM fuses each into one matmul with one scheme), levels 4 and 8 bits (Marlin / Machete;
    # 8-bit symmetric), groups in column order (compressed-tensors stores no act-order groups)
    serve: str | None = None

    budgets = ("bits", "mb")
    default_for = ("bits", "mb")
    options = {"levels": "levels", "group-size": "group_size", "sequential-level": "sequential_level",
               "static-groups": "static_groups", "serve": "serve", "sym": "sym", "act-order": "act_order",
               "mse": "mse", "shrink": "shrink"}
    tensors_per_unit = 4
    ylabel = "bits"
    integer_levels = True
    legacy = {"sequential_level": None, "shrink": 0.0, "static_groups": False, "serve": None}

    def __post_init__(self) -> None:
        self.levels = tuple(sorted(set(int(b) for b in self.levels)))
        if not self.levels or any(not 2 <= b <= 8 for b in self.levels):
            raise ConfigError(f"quantization levels must be bit-widths from 2 to 8, got {self.levels}")
        if self.sequential_level is not None:
            try:  # a bit-width, also as written on the command line ("w3")
                self.sequential_level = int(str(self.sequential_level).lstrip("w"))
            except ValueError:
                raise ConfigError(f"sequential_level {self.sequential_level!r}: give one of the bit-widths, "
                                  "e.g. w3 or 3") from None
            if self.sequential_level not in self.levels:
                raise ConfigError(f"sequential_level {self.sequential_level} is not one of the levels {self.levels}")
        if self.serve is not None:
            engine = SERVE.get(self.serve)
            if engine is None:
                raise ConfigError(f"serve {self.serve!r}: the engines are {', '.join(SERVE)}")
            extra = sorted(set(self.levels) - engine["levels"])
            if extra:
                raise ConfigError(f"{self.serve} has no fast kernel for {extra}-bit weights; give levels from "
                                  f"{sorted(engine['levels'])} (e.g. --levels 4,8)")
            if 8 in self.levels and not self.sym:
                raise ConfigError(f"{self.serve} runs asymmetric 8-bit weights on H100/H200 (Machete) only; "
                                  "pass --sym")
            if self.act_order:
                self.static_groups = True  # the only act-order groups the engine's format stores

    def values(self, unit) -> list:
        return list(self.levels)

    def ties(self, units) -> list[list[str]]:
        if self.serve is None:
            return []
        groups: dict[tuple, list[str]] = {}
        for name, u in units.items():
            for fused in SERVE[self.serve]["fused"]:
                if u.group in fused:
                    groups.setdefault((u.block, name.rsplit(".", 1)[0], fused), []).append(name)
        return [sorted(g, key=list(units).index) for g in groups.values() if len(g) > 1]

    def check_budget(self, budget) -> None:
        lo, hi = min(self.levels), max(self.levels)
        if budget.kind == "bits" and not lo <= budget.value <= hi:
            raise BudgetError(f"target of {budget.value:g} bits is outside the database levels {lo}..{hi}")

    def operator(self, bits: int):
        from ...ops import OPERATORS

        return OPERATORS.build("gptq", bits=bits, group_size=self.group_size, sym=self.sym,
                               act_order=self.act_order, damp=self.damp, mse=self.mse, shrink=self.shrink,
                               static_groups=self.static_groups)

    def build(self, db, model, windows, batch_size, device) -> None:
        if self.sequential_level is not None:
            def levels(n, w, st, want) -> dict:
                out = {}
                for bits in want:
                    pw = self.operator(bits).compress(w, st)
                    out[bits] = (pw, output_error(w, pw.dequantize(), st.hessian))
                return out

            on_shared_inputs(db, model, windows, batch_size, device, self.sequential_level, levels,
                             f"database (levels on {self.sequential_level}-bit inputs)")
            return
        linears = {n: m for n, m in Arch(model).all_linears().items() if n in db.units}
        for bits in self.levels:
            todo = {u for u, miss in db.missing().items() if bits in miss}
            if not todo:
                continue
            start = min(db.units[u].block for u in todo)
            log.info("level database: GPTQ %d-bit pass from block %d", bits, start)
            op = self.operator(bits)

            def do(n, mod, st, op=op, bits=bits, todo=todo):
                w = get_weight(mod).float()  # the module's own tensor: measure before replacing it
                pw = op.compress(w, st)
                w_hat = pw.dequantize()
                err = output_error(w, w_hat, st.hessian)
                set_weight(mod, w_hat)
                if n in todo:
                    db.add_levels(n, {bits: (pw, err)})

            with kept_weights(linears):  # each level's pass starts from the dense model
                # blocks before `start` already have this level: put it in so their outputs are right
                for n, mod in linears.items():
                    if db.units[n].block < start:
                        set_weight(mod, db.load(n, bits).dequantize())
                calibrate(model, windows.calib, do, sequential=self.sequential, start=start,
                          layers=lambda step: [n for n in step.linears if n in db.units], batch_size=batch_size,
                          device=device, desc=f"database {bits}-bit", split=True)
