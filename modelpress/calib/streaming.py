"""One-pass, true-sequential compression of a decoder block.

The block runs once over all calibration batches, each batch's forward pass in its own greenlet
(a coroutine with its own stack, all on the calling OS thread, so torch keeps one thread pool).
When a batch reaches a Linear layer it parks there; once every batch has parked at (or finished
past) that layer, the layer's input statistics are summed in batch order (deterministic) and the
layer is compressed; then the batches continue *through the compressed layer*. So q/k/v are
compressed before o_proj sees its inputs, gate/up before down_proj, and the block's outputs come
from the compressed block: "true sequential" GPTQ for any architecture at the cost of a single
forward pass per block. Layers fed the same input tensor share one XᵀX.

The whole pass runs under the compute dtype's autocast (torch's autocast state is per OS thread,
so every greenlet sees it); statistics and compression step out of it into float32.

Under data-parallel workers (utils.dist) each rank runs its own batches; the ranks agree on the
next layer to compress and sum its statistics (StatsReducer) before each solve. Given `settle`,
the layers fed the same tensor as the next one (found by running one batch through the block
first; the ranks merge what they saw) are compressed with it, and `settle()` runs before any
batch goes on: the caller's ranks solve such a group side by side and share the results there.
"""
from __future__ import annotations

import weakref
from typing import Callable

import torch
from greenlet import greenlet
from torch import nn

from ..utils.device import forwards, full_precision
from ..utils.dist import merged_dicts, reduce_int
from .stats import LinearStats, StatsReducer


def first_output(out):
    """A module's main output (transformers blocks return a tuple or the hidden states)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def input_groups(block: nn.Module, x: torch.Tensor | None, kwargs: dict | None, linears: dict[str, nn.Module],
                 kinds: dict[str, str]) -> dict[str, tuple[str, ...]]:
    """Layer -> the layers of `linears` that one forward of `block` on `x` feeds the same input
    tensor (and that want the same statistics), in `linears`' order; merged over data-parallel
    ranks, since a rank's batch may not reach every expert (a rank without batches, `x` None,
    takes part in the merge only). Layers no rank reaches are absent."""
    seen: dict[str, torch.Tensor] = {}
    if x is not None:
        hooks = [m.register_forward_pre_hook(lambda _m, args, n=n: seen.__setitem__(n, args[0]))
                 for n, m in linears.items()]
        try:
            with torch.no_grad(), forwards(next(block.parameters())):
                block(x, **kwargs)
        finally:
            for h in hooks:
                h.remove()
    order = [n for n in linears if n in seen]
    groups = {n: tuple(m for m in order if seen[m] is seen[n] and kinds.get(m, "none") == kinds.get(n, "none"))
              for n in order}
    return merged_dicts(groups)


def streaming_block_pass(block: nn.Module, inputs: list[torch.Tensor], kwargs: list[dict],
                         linears: dict[str, nn.Module], kinds: dict[str, str],
                         compress: Callable[[str, LinearStats | None], None],
                         product_dtype: torch.dtype = torch.float32,
                         settle: Callable[[], None] | None = None) -> list[torch.Tensor]:
    """Run `block` on every batch, compressing each layer of `linears` (via `compress(name, stats)`)
    as soon as all batches have produced its input. Returns the compressed block's outputs."""
    n = len(inputs)
    main = greenlet.getcurrent()
    arrived: dict[str, dict[int, torch.Tensor]] = {name: {} for name in linears}
    parked: dict[int, str] = {}  # batch -> layer it waits at
    outputs: list[torch.Tensor | None] = [None] * n
    shared: list[tuple[list[torch.Tensor], LinearStats]] = []  # summed inputs, reused by layers fed the same tensors
    current = {"b": -1}
    reducer = StatsReducer()
    groups = input_groups(block, inputs[0] if n else None, kwargs[0] if n else None, linears, kinds) \
        if settle is not None else {}
    fed: dict[str, dict[int, weakref.ref]] = {}  # a group's inputs, to check its later members see them
    done: set[str] = set()

    def stats_for(name: str) -> LinearStats | None:
        kind = kinds.get(name, "none")
        xs = [arrived[name][b] for b in sorted(arrived[name])]
        st = None
        if kind != "none" and xs:
            st = next((st for prev_xs, st in shared if len(prev_xs) == len(xs)
                       and all(a is b for a, b in zip(prev_xs, xs)) and (st.want_xtx or kind != "xtx")), None)
            if st is None:
                st = LinearStats(xs[0].shape[-1], want_xtx=(kind == "xtx"), product_dtype=product_dtype)
                for x in xs:
                    st.add(x)
                shared.append((xs, st))
        return reducer(name, st, kind, linears[name])

    def make_hook(name: str):
        def hook(mod, args):
            b = current["b"]
            if name in done:  # compressed with the group of an earlier layer fed the same tensor
                if name in fed and b in fed[name] and args[0] is not fed[name][b]():
                    raise RuntimeError(f"{name} was compressed with the statistics of the layers it shared its "
                                       "input with in a first forward, but this batch feeds it another tensor: "
                                       "the block's data flow depends on its data; run with one worker")
                return
            arrived[name][b] = args[0]  # the tensor itself (no autograd here): layers fed it share its XᵀX
            parked[b] = name
            main.switch()  # back to the scheduler until this layer is compressed

        return hook

    def body(b: int):
        with torch.no_grad():
            outputs[b] = first_output(block(inputs[b], **kwargs[b]))

    lets = [greenlet(lambda b=b: body(b)) for b in range(n)]
    handles = [m.register_forward_pre_hook(make_hook(name)) for name, m in linears.items()]
    try:
        with forwards(next(block.parameters())):
            runnable = list(range(n))
            order = list(linears)
            while True:
                for b in runnable:  # run each batch until it parks at a layer or finishes
                    current["b"] = b
                    lets[b].switch()
                live = [b for b in range(n) if not lets[b].dead]
                # the earliest layer (in definition order) some live batch waits at — on any rank: a
                # rank whose batches never reach a layer (an expert) still takes part in its sum
                waiting = {parked[b] for b in live}
                mine = next((i for i, nm in enumerate(order) if nm in waiting and nm not in done), len(order))
                i = reduce_int(mine, "min")
                if i == len(order):
                    break
                name = order[i]
                group = [m for m in groups.get(name, (name,)) if m not in done]  # `name` is not done
                with full_precision(next(block.parameters()).device):
                    st = stats_for(name)
                    for m in group:
                        compress(m, st)
                    if settle is not None:
                        settle()
                for m in group:
                    done.add(m)
                    if m != name:  # weak: the inputs are freed as soon as the forward is done with them
                        fed[m] = {b: weakref.ref(x) for b, x in arrived[name].items()}
                arrived[name] = {}
                runnable = [b for b in live if parked[b] == name]
    finally:
        for h in handles:
            h.remove()
        for g in lets:  # unwind batches left parked by an error
            if not g.dead:
                g.throw()  # GreenletExit: the greenlet ends quietly
    for name in linears:  # a layer no batch reached (an unused expert) gets no statistics
        if name not in done:
            compress(name, reducer(name, None, kinds.get(name, "none"), linears[name]))
    if settle is not None:
        settle()
    return outputs  # type: ignore[return-value]
