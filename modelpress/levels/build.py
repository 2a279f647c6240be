"""Build passes the kinds share: every missing level of a layer from one set of input statistics.

`on_dense_inputs`: the statistics of the dense model's inputs, block by block (what sparsity,
lowrank and gguf levels use). `on_shared_inputs`: the same, or with a reference level, those a
layer sees when the layers before it hold that level, in one true-sequential pass (quant with
`sequential_level`, joint). Both go through the calibration driver and leave the model dense.
"""
from __future__ import annotations

import logging
from typing import Callable

from ..calib.driver import calibrate, kept_weights
from ..calib.stats import LinearStats
from ..models.arch import Arch, get_weight, set_weight

log = logging.getLogger(__name__)

# (name, float32 weight, statistics, wanted values) -> {value: (packed weight, error)}
LevelsOfLayer = Callable[[str, object, LinearStats, list], dict]


def on_dense_inputs(db, model, windows, batch_size, device, desc: str,
                    per_layer: Callable[[str, object, LinearStats, list], None], after_block=None) -> None:
    """`per_layer(name, module, stats, missing values)` for every layer with missing levels, on the
    dense model's inputs."""
    missing = db.missing()
    calibrate(model, windows.calib, lambda n, mod, st: per_layer(n, mod, st, missing[n]), sequential=False,
              layers=lambda step: [n for n in step.linears if n in missing], batch_size=batch_size, device=device,
              desc=desc, after_block=after_block, split=True)


def on_shared_inputs(db, model, windows, batch_size, device, ref, levels_of_layer: LevelsOfLayer, desc: str) -> None:
    """Every missing level of a layer from one set of input statistics: the dense model's (`ref`
    None), or, in one true-sequential pass, those the layer sees when the layers before it hold
    level `ref`."""
    missing = db.missing()

    def one(n, lin, st: LinearStats) -> None:
        if n not in missing:  # built before an interruption: only its reference level goes in
            if ref is not None:
                set_weight(lin, db.load(n, ref).dequantize())
            return
        want = list(missing[n]) + ([ref] if ref is not None and ref not in missing[n] else [])
        new = levels_of_layer(n, get_weight(lin).float(), st, want)
        db.add_levels(n, {v: new[v] for v in missing[n]})
        if ref is not None:
            set_weight(lin, new[ref][0].dequantize())

    if ref is None:
        log.info("level database: every level from dense inputs")
        on_dense_inputs(db, model, windows, batch_size, device, desc, lambda n, mod, st, want: one(n, mod, st))
        return
    linears = {n: m for n, m in Arch(model).all_linears().items() if n in db.units}
    start = min(db.units[u].block for u in missing)
    log.info("level database: every level from level %s's inputs%s", ref, f", from block {start}" if start else "")
    with kept_weights(linears):
        for n, mod in linears.items():  # resuming a sequential build: earlier blocks hold the reference level
            if db.units[n].block < start:
                set_weight(mod, db.load(n, ref).dequantize())
        calibrate(model, windows.calib, one, sequential=True, start=start,
                  layers=lambda step: [n for n in step.linears if n in db.units], batch_size=batch_size,
                  device=device, desc=desc, split=True)
