"""Block influence of attention and MLP sub-blocks (ShortGPT): 1 − cos(residual before, after).

A sub-block that barely turns the residual stream is cheap to remove. Measured on calibration
windows with the dense model, one block at a time through the layer-wise runner.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...calib.runner import LayerwiseRunner, first_output
from ...models.arch import Arch
from ...utils.dist import reduce_


def _one_minus_cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a = a.reshape(-1, a.shape[-1]).float()
    b = b.reshape(-1, b.shape[-1]).float()
    return (1 - F.cosine_similarity(a, b, dim=-1)).sum()


@torch.no_grad()
def subblock_influence(model, ids: torch.Tensor, batch_size: int = 8) -> dict[str, float]:
    """Mean per-token 1 − cos between the residual stream before and after each sub-block."""
    arch = Arch(model)
    by_block: dict[int, list] = {}
    for sb in arch.subblocks():
        by_block.setdefault(sb.block, []).append(sb)
    scores: dict[str, float] = {}
    runner = LayerwiseRunner(model, ids, batch_size=batch_size, sequential=False)
    for step in runner.blocks(desc="block influence"):
        subs = sorted(by_block.get(step.index, []), key=lambda s: s.kind != "attn")  # attention first
        captured: dict[str, list] = {sb.name: [] for sb in subs}
        handles = [getattr(step.module, sb.attr).register_forward_hook(
            lambda m, a, out, n=sb.name: captured[n].append(first_output(out).detach())) for sb in subs]
        try:
            outs = step.forward()
        finally:
            for h in handles:
                h.remove()
        tot = {sb.name: 0.0 for sb in subs}
        n = 0
        for b, (h_in, h_out) in enumerate(zip(step.inputs, outs)):
            cur = h_in
            for sb in subs:
                nxt = cur + captured[sb.name][b]
                tot[sb.name] += float(_one_minus_cos(cur, nxt))
                cur = nxt
            n += h_in.shape[0] * h_in.shape[1]
        # data-parallel workers (utils.dist) each saw their share of the batches
        summed = reduce_(torch.tensor([*tot.values(), n], dtype=torch.float64))
        for k, v in zip(tot, summed[:-1].tolist()):
            scores[k] = v / float(summed[-1])
        step.dense_outputs = outs
        step.advance(sequential=False)
    return scores
