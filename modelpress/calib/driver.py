"""The one calibration driver: for each decoder block, stream or collect the inputs' statistics,
then call a function per layer.

    calibrate(model, ids, per_layer, stats="xtx", sequential=True)

`sequential=True`: one forward pass per block, each layer handed its statistics once every batch
has reached it, and the next block sees the outputs of the block as `per_layer` left it
(calib.streaming; GPTQ's true-sequential order). `sequential=False`: the statistics come from the
block as it is, `per_layer` is called for each layer, and the next block sees that block's
outputs from before the calls (every layer measured on the dense model's inputs). Everything that
calibrates layer by layer (compress, the level database's builders, BitStack) goes through here.

A routed expert that calibration leaves (nearly) without tokens — fewer than a quarter of its
input width, so its XᵀX has rank below a quarter and a solve on it fits those few tokens — is
handed isotropic statistics instead (`LinearStats.isotropic`: every operator's data-free form).
`calibrate` returns those layers with the tokens they got, for the report.

`kept_weights(modules)` snapshots weights and puts them back on exit, for passes that change the
model only to see what later layers receive.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Callable, Iterator

import torch
from torch import nn

from ..errors import DataError
from ..models.arch import Arch, get_weight, set_weight
from ..models.moe import expert_of
from ..utils.dist import broadcast_, world
from .runner import BlockStep, LayerwiseRunner
from .stats import LinearStats

log = logging.getLogger(__name__)

PerLayer = Callable[[str, nn.Module, "LinearStats | None"], None]

# a routed expert with fewer calibration tokens than its input width / this gets isotropic statistics
FEW_TOKENS_DIV = 4


@torch.no_grad()
def calibrate(model, ids: torch.Tensor, per_layer: PerLayer, *, stats: str | dict[str, str] = "xtx",
              sequential: bool = True, layers: Callable[[BlockStep], list[str]] | None = None, start: int = 0,
              batch_size: int = 8, device=None, desc: str = "calibration",
              after_block: Callable[[BlockStep], None] | None = None, split: bool = False) -> dict[str, int]:
    """Walk the blocks over calibration windows `ids`, calling `per_layer(name, module, stats)` for
    every Linear that `layers(step)` names (default: all of the block's).

    Blocks before `start` are only run forward, as they are (a resumed build puts the levels they
    already have into them first). `after_block(step)` runs once a block's layers are done.
    Returns the experts given isotropic statistics: name -> calibration tokens it received.

    Under data-parallel workers (utils.dist) every rank calls `per_layer` for every layer, with the
    same summed statistics. With `split`, the k-th layer handed out goes to rank k mod N alone and
    its weight, as `per_layer` left it, is broadcast to the others: for callers whose other effects
    land in shared storage (the level database's files). A layer's owner is fixed by its place
    among the model's layers, so a resumed build gives each unit the same writer in every pass. In
    a sequential pass the next layer's forward needs the broadcast weight, so the ranks' solves
    follow one another (what is shared out is the writing, not the time); with
    `sequential=False` the weights stay dense, nothing is broadcast and the solves run side by side."""
    kinds = stats
    starved: dict[str, int] = {}
    rank, size = world()
    owner_of = {n: i % size for i, n in enumerate(Arch(model).all_linears())} if split and size > 1 else {}

    def handed(n: str, mod: nn.Module, st: LinearStats | None) -> None:
        kind = kinds if isinstance(kinds, str) else kinds.get(n, "none")
        width = get_weight(mod).shape[1]
        if st is not None and st.sqnorm is not None and not bool(torch.isfinite(st.sqnorm).all()):
            raise DataError(f"the calibration inputs of {n} hold NaN or Inf values (or overflow float32 when "
                            "squared): the model is not finite on this text; check its weights, or run the forwards "
                            "in float32 (--compute-dtype float32)")
        if kind != "none" and expert_of(n) and (st is None or st.n < width // FEW_TOKENS_DIV):
            starved[n] = 0 if st is None else st.n
            st = LinearStats.isotropic(width, want_xtx=(kind == "xtx"), device=get_weight(mod).device)
        if owner_of:
            if rank == owner_of[n]:
                per_layer(n, mod, st)
            if sequential:  # the next layers' inputs go through this one as its owner left it
                broadcast_(mod.weight.data, owner_of[n])
        else:
            per_layer(n, mod, st)

    runner = LayerwiseRunner(model, ids, batch_size=batch_size, sequential=sequential, device=device)
    for step in runner.blocks(desc=desc, start=start):
        names = list(step.linears) if layers is None else layers(step)
        if not names:
            step.advance(sequential=sequential)
        elif sequential:
            step.compress_streaming(stats, lambda n, st, step=step: handed(n, step.linears[n], st), names=names)
        else:
            collected = step.collect(stats, names=names)
            for n in names:
                handed(n, step.linears[n], collected.get(n))
            del collected
            step.advance(sequential=False)
        if after_block is not None:
            after_block(step)
    if starved:
        log.warning("%d expert layers got fewer than 1/%d of their input width in calibration tokens and were "
                    "compressed with isotropic statistics (data-free): %s", len(starved), FEW_TOKENS_DIV,
                    ", ".join(list(starved)[:4]) + (" ..." if len(starved) > 4 else ""))
    return starved


@contextlib.contextmanager
def kept_weights(modules: dict[str, nn.Module]) -> Iterator[dict[str, torch.Tensor]]:
    """Snapshot the weights of `modules` (name -> Linear-like); put them back on exit, however the
    block exits. Yields the snapshot (name -> weight)."""
    saved = {n: get_weight(m).detach().clone() for n, m in modules.items()}
    try:
        yield saved
    finally:
        for n, w in saved.items():
            set_weight(modules[n], w)
