"""The layer-wise calibration runner, one for every architecture.

It captures the inputs of the first decoder block by running the model up to it, then walks the
blocks one at a time: statistics of a block's Linear inputs are gathered by hooks, the caller
compresses the block, and the block's outputs become the next block's inputs. In sequential mode
the outputs are recomputed with the *compressed* block (errors of earlier blocks are seen by later
ones, as GPTQ does); otherwise the dense block's outputs are used. Memory: one block on the device
plus the calibration activations (inputs and outputs of the current block). A streamed model's
blocks (models.streamed) are read from disk as the walk reaches them and freed after.
"""
from __future__ import annotations

import logging
from typing import Callable, Iterator

import torch
from torch import nn

from ..models.arch import Arch
from ..models.streamed import streamed
from ..utils.device import forward_dtype, forwards
from ..utils.dist import world
from ..utils.progress import progress
from .stats import LinearStats, StatsCollector, StatsReducer
from .streaming import first_output, streaming_block_pass

log = logging.getLogger(__name__)


# XᵀX products per batch: in the compute dtype (on the matrix units, summed in float32) or float32.
XTX_PRODUCTS = "compute"


class _Captured(Exception):
    pass


def _to(x, device):
    if torch.is_tensor(x):
        return x.to(device)
    if isinstance(x, tuple):
        return tuple(_to(v, device) for v in x)
    if isinstance(x, list):
        return [_to(v, device) for v in x]
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    return x


@torch.no_grad()
def capture_block_inputs(model: nn.Module, arch: Arch, ids: torch.Tensor, batch_size: int,
                         device: torch.device) -> tuple[list[torch.Tensor], list[dict]]:
    """Run the model up to its first block on each batch; return the block's inputs and kwargs.
    Under data-parallel workers (utils.dist) a rank takes batches rank, rank + N, ..."""
    inputs: list[torch.Tensor] = []
    kwargs_list: list[dict] = []

    def pre_hook(mod, args, kwargs):
        h = args[0] if args else kwargs.pop("hidden_states")
        kw = {k: v for k, v in kwargs.items() if k not in ("hidden_states",)}
        inputs.append(h.detach().to(device))
        kwargs_list.append(_to(kw, device))
        raise _Captured

    handle = arch.blocks[0].register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        model_dev = next(model.parameters()).device
        rank, size = world()
        for s in list(range(0, len(ids), batch_size))[rank::size]:  # data-parallel: every size-th batch
            try:
                with forwards(model):
                    model(input_ids=ids[s:s + batch_size].to(model_dev), use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    return inputs, kwargs_list


class BlockStep:
    """One decoder block during a layer-wise pass. Obtained from `LayerwiseRunner.blocks()`."""

    def __init__(self, runner: "LayerwiseRunner", index: int):
        self.runner = runner
        self.index = index
        self.module = runner.arch.blocks[index]
        self.name = runner.arch.block_name(index)
        self.linears = runner.arch.linears(index)
        self.dense_outputs: list[torch.Tensor] | None = None
        self._advanced = False

    @property
    def inputs(self) -> list[torch.Tensor]:
        return self.runner.inputs

    @torch.no_grad()
    def forward(self, inputs: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Run the block (as it is now) on `inputs` (default: its calibration inputs)."""
        inputs = self.runner.inputs if inputs is None else inputs
        with forwards(self.runner.model):
            return [first_output(self.module(h, **kw)) for h, kw in zip(inputs, self.runner.kwargs)]

    @torch.no_grad()
    def collect(self, kinds: dict[str, str] | str = "xtx", names: list[str] | None = None) -> dict[str, LinearStats]:
        """Run the block with hooks and return statistics per Linear name.

        `kinds` is "xtx", "norms" or a per-name dict. The outputs of this pass are kept as the
        block's dense outputs (used by `advance()` when not sequential).
        """
        names = list(self.linears) if names is None else names
        if isinstance(kinds, str):
            kinds = {n: kinds for n in names}
        mods = {n: self.linears[n] for n in names}
        outs = []
        with StatsCollector(mods, kinds, self.runner.product_dtype) as col, forwards(self.runner.model):
            for h, kw in zip(self.runner.inputs, self.runner.kwargs):
                outs.append(first_output(self.module(h, **kw)))
                col.end_batch()
        if self.dense_outputs is None:
            self.dense_outputs = outs
        reducer = StatsReducer()  # data-parallel ranks sum their statistics (utils.dist)
        return {n: st for n in names
                if (st := reducer(n, col.stats.get(n), kinds.get(n, "none"), mods[n])) is not None}

    def compress_streaming(self, kinds: dict[str, str] | str,
                           compress: Callable[[str, LinearStats | None], None],
                           names: list[str] | None = None, settle: Callable[[], None] | None = None) -> None:
        """Compress the block's layers true-sequentially in one forward pass (see calib.streaming)
        and move on: the next block's inputs are this compressed block's outputs. `settle`: layers
        fed the same tensor are compressed together, then `settle()` runs before the forward goes
        on through them (data-parallel ranks share their solves there)."""
        names = list(self.linears) if names is None else names
        if isinstance(kinds, str):
            kinds = {n: kinds for n in names}
        mods = {n: self.linears[n] for n in names}
        self.runner.inputs = streaming_block_pass(self.module, self.runner.inputs, self.runner.kwargs,
                                                  mods, kinds, compress, self.runner.product_dtype, settle=settle)
        self.dense_outputs = None
        self._advanced = True

    @torch.no_grad()
    def advance(self, sequential: bool | None = None) -> None:
        """Set the next block's inputs: the compressed block's outputs (sequential) or the dense ones."""
        seq = self.runner.sequential if sequential is None else sequential
        if seq or self.dense_outputs is None:
            outs = self.forward()
        else:
            outs = self.dense_outputs
        self.runner.inputs = outs
        self.dense_outputs = None
        self._advanced = True


class LayerwiseRunner:
    """Walk the decoder blocks of `model` over calibration windows `ids`.

    >>> runner = LayerwiseRunner(model, windows.calib)
    >>> for step in runner.blocks():
    ...     stats = step.collect("xtx")
    ...     ...  # compress step.linears using stats
    ...     step.advance()
    """

    def __init__(self, model: nn.Module, ids: torch.Tensor, *, batch_size: int = 8,
                 sequential: bool = True, device: torch.device | str | None = None,
                 xtx_products: str = XTX_PRODUCTS):
        self.model = model
        if xtx_products not in ("compute", "float32"):
            raise ValueError(f"xtx_products must be 'compute' or 'float32', got {xtx_products!r}")
        # the forwards' dtype is read here, outside any greenlet (see utils.device)
        fwd = forward_dtype(model)
        self.product_dtype = fwd if xtx_products == "compute" else torch.float32
        self.arch = Arch(model)
        self.ids = ids
        self.batch_size = batch_size
        self.sequential = sequential
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.inputs: list[torch.Tensor] = []
        self.kwargs: list[dict] = []

    def blocks(self, desc: str = "blocks", start: int = 0) -> Iterator[BlockStep]:
        self.inputs, self.kwargs = capture_block_inputs(self.model, self.arch, self.ids, self.batch_size, self.device)
        stream = streamed(self.model)
        for i in progress(range(len(self.arch)), desc=desc, total=len(self.arch)):
            blk = self.arch.blocks[i]
            if stream is not None:  # the block comes from disk and goes back to it (models.streamed)
                stream.load_block(i, self.device)
                home = self.device
            else:
                home = next(blk.parameters()).device
            if home != self.device:
                blk.to(self.device)
            step = BlockStep(self, i)
            try:
                if i < start:
                    step.advance(sequential=True)
                    continue
                yield step
                if not step._advanced:
                    step.advance()
            finally:
                if stream is not None:
                    stream.release_block(i)
                elif home != self.device:
                    blk.to(home)
        self.inputs, self.kwargs = [], []
