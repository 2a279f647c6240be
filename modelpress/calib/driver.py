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
from ..utils.dist import broadcast_, from_rank, world
from .runner import BlockStep, LayerwiseRunner
from .stats import LinearStats

log = logging.getLogger(__name__)

PerLayer = Callable[[str, nn.Module, "LinearStats | None"], object]

# a routed expert with fewer calibration tokens than its input width / this gets isotropic statistics
FEW_TOKENS_DIV = 4


@torch.no_grad()
def calibrate(model, ids: torch.Tensor, per_layer: PerLayer, *, stats: str | dict[str, str] = "xtx",
              sequential: bool = True, layers: Callable[[BlockStep], list[str]] | None = None, start: int = 0,
              batch_size: int = 8, device=None, desc: str = "calibration",
              after_block: Callable[[BlockStep], None] | None = None, split: bool = False,
              adopt: Callable[[str, nn.Module, object], None] | None = None) -> dict[str, int]:
    """Walk the blocks over calibration windows `ids`, calling `per_layer(name, module, stats)` for
    every Linear that `layers(step)` names (default: all of the block's).

    Blocks before `start` are only run forward, as they are (a resumed build puts the levels they
    already have into them first). `after_block(step)` runs once a block's layers are done.
    Returns the experts given isotropic statistics: name -> calibration tokens it received.

    Under data-parallel workers (utils.dist) every rank calls `per_layer` for every layer, with the
    same summed statistics, unless the layers are split. With `split`, the k-th layer handed out
    goes to rank k mod N alone: its weight, as `per_layer` left it, is broadcast to the others
    (for callers whose other effects land in shared storage: the level database's files); with
    `adopt` too, what `per_layer` returned is handed to every rank, which calls
    `adopt(name, module, result)` in the layers' order, the owner too (compress: the packed
    weight, which every rank then holds in the same order). A solve that raises on its owner
    raises on every rank (as the error it was, where modelpress defines it). A
    layer's owner is fixed by its place among the model's layers, so a resumed build gives each
    unit the same writer in every pass. Layers fed the same input tensor are solved side by side
    (calib.streaming's groups, in a true-sequential pass too; every layer of a block on dense
    inputs); a layer whose inputs pass through earlier ones waits for their results."""
    kinds = stats
    starved: dict[str, int] = {}
    rank, size = world()
    owner_of = {n: i % size for i, n in enumerate(Arch(model).all_linears())} if (split or adopt) and size > 1 else {}
    pending: list[tuple[str, nn.Module, object]] = []  # solved (here or elsewhere), not yet shared
    solved = [0, 0]  # here, in all

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
        solved[1] += 1
        if owner_of:
            mine = rank == owner_of[n]
            result = None
            if mine:
                try:
                    result = per_layer(n, mod, st)
                except Exception as e:  # the other ranks would wait for this layer forever
                    result = _Failed(e)
            pending.append((n, mod, result))
            solved[0] += mine
        else:
            per_layer(n, mod, st)
            solved[0] += 1

    def settle(weights: bool = True) -> None:
        """Hand every pending layer's result from its owner to the other ranks."""
        todo = list(pending)
        pending.clear()
        for n, mod, result in todo:
            got = from_rank(result if adopt is not None or isinstance(result, _Failed) else None, owner_of[n])
            if isinstance(got, _Failed):
                raise result.error if isinstance(result, _Failed) else got.remade()
            if adopt is not None:
                adopt(n, mod, got)
            elif weights:
                broadcast_(mod.weight.data, owner_of[n])

    runner = LayerwiseRunner(model, ids, batch_size=batch_size, sequential=sequential, device=device)
    for step in runner.blocks(desc=desc, start=start):
        names = list(step.linears) if layers is None else layers(step)
        if not names:
            step.advance(sequential=sequential)
        elif sequential:  # the next layers' inputs go through each group as its owners left it
            step.compress_streaming(stats, lambda n, st, step=step: handed(n, step.linears[n], st), names=names,
                                    settle=settle if owner_of else None)
        else:  # the weights stay dense for the block's outputs: a database's need not be shared
            collected = step.collect(stats, names=names)
            for n in names:
                handed(n, step.linears[n], collected.get(n))
            del collected
            settle(weights=False)
            step.advance(sequential=False)
        if after_block is not None:
            after_block(step)
    if owner_of:
        log.info("worker %d of %d solved %d of the %d layers", rank, size, solved[0], solved[1])
    if starved:
        log.warning("%d expert layers got fewer than 1/%d of their input width in calibration tokens and were "
                    "compressed with isotropic statistics (data-free): %s", len(starved), FEW_TOKENS_DIV,
                    ", ".join(list(starved)[:4]) + (" ..." if len(starved) > 4 else ""))
    return starved


class _Failed:
    """A solve that raised on its owner rank, as the other ranks receive it."""

    def __init__(self, error: Exception):
        self.error = error
        self.kind, self.text = type(error).__name__, str(error)

    def __getstate__(self):  # the exception itself may not pickle
        return {"kind": self.kind, "text": self.text}

    def __setstate__(self, state):
        self.error = None
        self.kind, self.text = state["kind"], state["text"]

    def remade(self) -> Exception:
        from .. import errors

        cls = getattr(errors, self.kind, None)
        return cls(self.text) if isinstance(cls, type) and issubclass(cls, Exception) else \
            RuntimeError(f"another worker's solve failed: {self.kind}: {self.text}")


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
