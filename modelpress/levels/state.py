"""Plans applied to a model: levels from a database put in place, incrementally and reversibly."""
from __future__ import annotations

from collections import OrderedDict

import torch

from ..models.arch import Arch, Dropped, get_weight, set_weight
from .database import LevelDB


class PlanState:
    """Applies level choices to a model from a database, incrementally and reversibly.

    Keeps the dense weights (or the original sub-block modules) so any unit can go back; caches
    dequantized levels so switching during a search costs a copy, not a decode.
    """

    def __init__(self, model, db: LevelDB, cache: bool = True, cache_bytes: int = 2 << 30):
        """The model must be dense (no plan applied) when the state is made. At most one PlanState
        should drive a model at a time: each assumes it knows what the model holds."""
        self.model = model
        self.db = db
        self.arch = Arch(model)
        self.current: dict[str, object] = {u: None for u in db.units}  # None = dense / original
        self.cache = cache
        self.cache_bytes = cache_bytes
        self._deq: "OrderedDict[tuple[str, str], torch.Tensor]" = OrderedDict()
        self._deq_bytes = 0
        if db.kind.module_levels:
            self._orig = {sb.name: getattr(self.arch.blocks[sb.block], sb.attr) for sb in self.arch.subblocks()
                          if sb.name in db.units}
        else:
            mods = dict(model.named_modules())
            self._mods = {u: mods[u] for u in db.units}
            self._dense = {u: get_weight(m).detach().clone() for u, m in self._mods.items()}

    def _weight(self, unit: str, value) -> torch.Tensor:
        key = (unit, str(value))
        if key in self._deq:
            self._deq.move_to_end(key)
            return self._deq[key]
        w = self.db.load(unit, value).dequantize()
        if self.cache:  # least recently used levels are dropped beyond cache_bytes
            self._deq[key] = w
            self._deq_bytes += w.numel() * w.element_size()
            while self._deq_bytes > self.cache_bytes and len(self._deq) > 1:
                _, old = self._deq.popitem(last=False)
                self._deq_bytes -= old.numel() * old.element_size()
        return w

    def set(self, unit: str, value) -> None:
        if self.current[unit] == value:
            return
        if self.db.kind.module_levels:
            info = self.db.units[unit]
            blk = self.arch.blocks[info.block]
            attr = unit.rsplit(".", 1)[1]
            orig = self._orig[unit]
            if value == "dropped":
                setattr(blk, attr, Dropped(info.group, getattr(orig, "layer_idx", info.block if info.group == "attn" else None)))
            else:
                setattr(blk, attr, orig)
        else:
            set_weight(self._mods[unit], self._dense[unit] if value is None else self._weight(unit, value))
        self.current[unit] = value

    def apply(self, values: dict[str, object]) -> None:
        for u, v in values.items():
            self.set(u, v)

    def restore(self) -> None:
        for u in list(self.current):
            self.set(u, "kept" if self.db.kind.module_levels else None)
