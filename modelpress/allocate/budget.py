"""Budgets, and the cost table of a level database under a budget.

    bits      average nominal bits per weight of the compressed layers (Σ bits·numel / Σ numel)
    sparsity  global fraction of pruned weights in the compressed layers
    drop      number of removed sub-blocks
    mb        total size in MB as stored: packed layers (codes, scales, zeros, masks, permutations)
              plus everything else (embeddings, lm_head, norms) in float16 and the file header
"""
from __future__ import annotations

import dataclasses

from ..errors import BudgetError
from .problem import Problem

HEADER_BYTES_PER_TENSOR = 160  # safetensors JSON header entry, generous (databases without exact header counts)


def header_entry_bytes(name: str, shape: tuple[int, ...]) -> int:
    """Upper bound on one tensor's entry in a safetensors header,
    "NAME":{"dtype":"F16","shape":[D1,D2],"data_offsets":[A,B]}, with a dtype of up to 4 characters
    and offsets of up to 10 digits."""
    dims = ",".join(str(d) for d in shape)
    return len(f'"{name}":{{"dtype":"XXXX","shape":[{dims}],"data_offsets":[1234567890,1234567890]}},')


def _offset_saving(budget: "Budget", n_tensors: int) -> int:
    """Header entries are bounded with 10-digit offsets; in a file of the target size they are at
    most as long as its byte count: the bytes that saves over `n_tensors` entries."""
    digits = min(10, len(str(max(1, int(budget.value * 1e6)))))
    return 2 * (10 - digits) * n_tensors


@dataclasses.dataclass(frozen=True)
class Budget:
    kind: str
    value: float

    def __post_init__(self) -> None:
        if self.kind not in ("bits", "sparsity", "drop", "mb"):
            raise BudgetError(f"unknown budget {self.kind!r}; use bits, sparsity, drop or mb")

    def label(self) -> str:
        return {"bits": f"{self.value:g} bits/weight", "sparsity": f"{100 * self.value:g}% sparsity",
                "drop": f"{int(self.value)} sub-blocks dropped", "mb": f"{self.value:g} MB"}[self.kind]


def level_cost(budget: Budget, db, unit: str, value) -> int:
    info = db.units[unit]
    if budget.kind == "bits":
        return int(value) * info.numel
    if budget.kind == "sparsity":
        return info.numel - int(value)
    if budget.kind == "drop":
        return 1 if value == "kept" else 0
    meta = db.level_meta(unit, value)
    if "fixed_header_bytes" in db.meta:  # each level pays for its own header entries
        return int(meta["nbytes"]) + int(meta["header_bytes"]) - _offset_saving(budget, int(meta["tensors"]))
    return int(meta["nbytes"])


def make_problem(db, budget: Budget) -> Problem:
    """The allocation problem of `db` under `budget` (costs in the budget's unit)."""
    if budget.kind not in db.kind.budgets:
        raise BudgetError(f"a {budget.kind} budget does not apply to a {db.kind.registered_name} database "
                          f"(it takes: {', '.join(db.kind.budgets)})")
    units = list(db.units)
    values = [db.values(u) for u in units]
    costs = [[level_cost(budget, db, u, v) for v in vs] for u, vs in zip(units, values)]
    errors = [[float(db.level_meta(u, v)["error"]) for v in vs] for u, vs in zip(units, values)]
    numel = [db.units[u].numel for u in units]
    total_numel = sum(numel)
    v = budget.value
    db.kind.check_budget(budget)
    if budget.kind == "bits":
        total = int(v * total_numel)
    elif budget.kind == "sparsity":
        total = int((1 - v) * total_numel)
    elif budget.kind == "drop":
        if v != int(v) or not 0 <= v <= len(units):
            raise BudgetError(f"can drop 0..{len(units)} sub-blocks, not {v:g}")
        total = len(units) - int(v)
    else:
        if "fixed_header_bytes" in db.meta:
            overhead = (db.meta["fixed_bytes"] + db.meta["fixed_header_bytes"]
                        - _offset_saving(budget, db.meta["fixed_tensors"]))
        else:
            overhead = db.meta["fixed_bytes"] + HEADER_BYTES_PER_TENSOR * (len(units) * db.kind.tensors_per_unit + 8)
        total = int(v * 1e6) - overhead
        floor = (sum(c[0] for c in costs) + overhead) / 1e6
        if total < sum(c[0] for c in costs):
            raise BudgetError(f"{v:g} MB is below the smallest model these levels can make ({floor:.2f} MB, "
                              "embeddings and norms included); raise --target-mb or allow cheaper levels")
    labels = [db.kind.labels(db.units[u], vs) for u, vs in zip(units, values)]
    extra = {"block": [db.units[u].block for u in units], "numel": numel, "values": values}
    for key in ("outlier_ratio", "influence"):
        if all(key in db.units[u].extra for u in units):
            extra[key] = [db.units[u].extra[key] for u in units]
    groups = [db.units[u].group for u in units]
    ties = db.kind.ties(db.units)
    if ties:
        return _tied(units, costs, errors, total, labels, groups, extra, ties)
    return Problem(units, costs, errors, total, labels=labels, groups=groups, extra=extra)


def _tied(units, costs, errors, total, labels, groups, extra, ties: list[list[str]]) -> Problem:
    """The problem with each tie group as one unit: one level for all its members, its cost and
    error the members' sums (so a bits or MB budget stays exact), its members in extra["members"]."""
    index = {u: i for i, u in enumerate(units)}
    tied = {u for group in ties for u in group}
    merged = [[index[u] for u in group] for group in ties] + [[index[u]] for u in units if u not in tied]
    merged.sort(key=lambda idx: idx[0])  # model order
    for idx in merged:
        if any(extra["values"][j] != extra["values"][idx[0]] for j in idx):
            raise BudgetError(f"tied layers {', '.join(units[j] for j in idx)} do not have the same levels")
    out = {"block": [extra["block"][idx[0]] for idx in merged], "numel": [sum(extra["numel"][j] for j in idx)
                                                                          for idx in merged],
           "values": [extra["values"][idx[0]] for idx in merged], "members": [[units[j] for j in idx] for idx in merged]}
    return Problem(["+".join([units[idx[0]]] + [units[j].rsplit(".", 1)[-1] for j in idx[1:]]) for idx in merged],
                   [[sum(costs[j][i] for j in idx) for i in range(len(costs[idx[0]]))] for idx in merged],
                   [[sum(errors[j][i] for j in idx) for i in range(len(errors[idx[0]]))] for idx in merged],
                   total, labels=[labels[idx[0]] for idx in merged],
                   groups=["+".join(groups[j] for j in idx) for idx in merged], extra=out)
