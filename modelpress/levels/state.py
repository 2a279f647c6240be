"""Plans applied to a model: levels from a database put in place, incrementally and reversibly."""
from __future__ import annotations

from collections import OrderedDict

import torch

from ..models.arch import Arch, Dropped, get_weight, set_weight
from ..models.streamed import streamed
from .database import LevelDB


class PlanState:
    """Applies level choices to a model from a database, incrementally and reversibly.

    Keeps the dense weights (or the original sub-block modules) so any unit can go back; caches
    dequantized levels so switching during a search costs a copy, not a decode.

    On a streamed model (models.streamed) a block on disk holds nothing to set: the state records
    the choice and `load_levels(i)` puts block i's levels in once it is read (dense) from disk, which
    `models.streamed.block_forwards(model, on_load=state.load_levels)` does during a forward.
    """

    def __init__(self, model, db: LevelDB, cache: bool = True, cache_bytes: int = 2 << 30):
        """The model must be dense (no plan applied) when the state is made. At most one PlanState
        should drive a model at a time: each assumes it knows what the model holds."""
        self.model = model
        self.db = db
        self.arch = Arch(model)
        self.current: dict[str, object] = {u: None for u in db.units}  # None = dense / original
        self._stream = streamed(model)
        # a streamed model is one that does not fit: its levels are decoded as its blocks come in
        self.cache = cache and self._stream is None
        self.cache_bytes = cache_bytes
        self._deq: "OrderedDict[tuple[str, str], torch.Tensor]" = OrderedDict()
        self._deq_bytes = 0
        if db.kind.module_levels:
            self._orig = {sb.name: getattr(self.arch.blocks[sb.block], sb.attr) for sb in self.arch.subblocks()
                          if sb.name in db.units}
        else:
            mods = dict(model.named_modules())
            self._mods = {u: mods[u] for u in db.units}
            # a streamed block's dense weights are its files: nothing to keep
            self._dense = {u: get_weight(m).detach().clone() for u, m in self._mods.items() if not get_weight(m).is_meta}

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
        elif unit in self._dense:
            set_weight(self._mods[unit], self._dense[unit] if value is None else self._weight(unit, value))
        elif not get_weight(self._mods[unit]).is_meta:  # a streamed block in memory right now
            if value is None:  # its dense weight, as stored (the module's own layout)
                self._mods[unit].weight.data.copy_(self._stream.source.read(unit + ".weight"))
            else:
                set_weight(self._mods[unit], self._weight(unit, value))
        self.current[unit] = value

    def load_levels(self, block: int) -> None:
        """Put the chosen levels of block `block`'s units into it (a streamed block just read from
        disk holds its dense weights)."""
        if self.db.kind.module_levels:
            return
        for u, v in self.current.items():
            if (v is not None and u not in self._dense and self.db.units[u].block == block
                    and not get_weight(self._mods[u]).is_meta):
                set_weight(self._mods[u], self._weight(u, v))

    def apply(self, values: dict[str, object]) -> None:
        for u, v in values.items():
            self.set(u, v)

    def restore(self) -> None:
        for u in list(self.current):
            self.set(u, "kept" if self.db.kind.module_levels else None)
