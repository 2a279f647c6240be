"""The uncompressed reference: every token's keys and values, as the model computes them."""
from __future__ import annotations

import dataclasses


from .base import KV_METHODS, Buffer, KVMethod, RowStore


class FullStore(RowStore):
    def __init__(self, *a):
        super().__init__(*a)
        self.k, self.v, self.pos = Buffer(1), Buffer(1), Buffer(0)

    def append(self, k, v, pos):
        self.k.append(self.keep(k))
        self.v.append(self.keep(v))
        self.pos.append(pos)

    def materialize(self):
        return self.give(self.k.view()), self.give(self.v.view()), self.pos.view().expand(self.n_heads, -1)

    def nbytes(self):
        return 0 if self.k.data is None else 2 * self.k.view().numel() * self.k.data.element_size()


@KV_METHODS.register("full")
@dataclasses.dataclass
class Full(KVMethod):
    store = FullStore
