"""depth: units = attention / MLP sub-blocks; levels = dropped or kept. Nothing is stored per
level: a unit's error when dropped is its block influence (ShortGPT), kept in db.json."""
from __future__ import annotations

import dataclasses

from ...models.arch import Arch
from .base import KINDS, Kind, UnitInfo


@KINDS.register("depth")
@dataclasses.dataclass
class DepthKind(Kind):
    budgets = ("drop", "mb")
    default_for = ("drop",)
    ylabel = "kept / dropped"
    module_levels = True
    streams = False  # its plans swap modules of the model held in memory

    def discover(self, model) -> list[UnitInfo]:
        arch = Arch(model)
        return [UnitInfo(sb.name, None, sum(p.numel() for p in getattr(arch.blocks[sb.block], sb.attr).parameters()),
                         sb.block, sb.kind) for sb in arch.subblocks()]

    def values(self, unit: UnitInfo) -> list:
        return ["dropped", "kept"]

    def fixed_bytes(self, model, units, tokenizer=None) -> int:
        from ..database import fixed_bytes

        return fixed_bytes(model, units, depth=True)

    def usable(self, db, unit: str) -> list:
        return self.values(db.units[unit])

    def missing(self, db) -> dict[str, list]:
        if all("influence" in u.extra for u in db.units.values()):
            return {}
        return {u: ["dropped"] for u in db.units}

    def level_meta(self, db, unit: str, value) -> dict:
        info = db.units[unit]
        kept = value == "kept"
        return {"nbytes": 2 * info.numel if kept else 0, "error": 0.0 if kept else info.extra["influence"]}

    def build(self, db, model, windows, batch_size, device=None) -> None:
        from ...ops.drop.influence import subblock_influence

        scores = subblock_influence(model, windows.calib, batch_size=batch_size)
        for n in db.units:
            db.set_unit_extra(n, influence=scores[n])
        db.save_meta()
