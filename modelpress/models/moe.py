"""Mixture-of-experts: every expert's projections as Linear layers, so each is a unit of its own.

transformers keeps a sparse block's experts fused, as 3-D parameters (`gate_up_proj`: experts x
2·inter x hidden, `down_proj`: experts x hidden x inter; Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE),
which the unit discovery (models.arch: Linear layers) does not see — the bulk of an MoE's weights
would silently stay dense. `unfuse_experts` replaces each such module by `ExpertLinears`: the same
computation with expert e's projections as `experts.<e>.gate_proj / up_proj / down_proj`
(nn.Linear). Routers (`gate`) are Linear-like parameters outside the experts and stay dense;
shared experts are ordinary MLPs and become units like any other. `fuse_experts` puts the
original modules back (for writing a Hugging Face folder).

Experts that routing sends few calibration tokens are compressed with isotropic statistics
(their data-free form; calib.driver), and reports list them.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from ..errors import UnsupportedArchitectureError
from .arch import replace_module

log = logging.getLogger(__name__)


def looks_fused(m: nn.Module) -> bool:
    """3-D `gate_up_proj` and `down_proj` parameters: transformers' fused experts layout."""
    p = getattr(m, "gate_up_proj", None)
    d = getattr(m, "down_proj", None)
    return isinstance(p, nn.Parameter) and isinstance(d, nn.Parameter) and p.dim() == 3 and d.dim() == 3


def is_fused_experts(m: nn.Module) -> bool:
    """Fused experts that ExpertLinears computes exactly: [gate; up] concatenated, not transposed,
    no biases, no norm after each expert, the default gate act(gate) * up (transformers'
    `use_experts_implementation` flags; Mixtral, Qwen2/3-MoE, OLMoE). Models that clamp, limit or
    normalise inside their experts (GPT-OSS, Llama 4, DeepSeek-V4, ...) do not qualify."""
    if not looks_fused(m) or not hasattr(m, "act_fn"):
        return False
    if (not getattr(m, "is_concatenated", True) or getattr(m, "is_transposed", False) or getattr(m, "has_bias", False)
            or getattr(m, "has_post_expert_norm", False) or not getattr(m, "has_gate", True)):
        return False
    try:
        from transformers.integrations.moe import _default_apply_gate
    except ImportError:  # an older transformers: no gate hook to differ from
        return True
    return getattr(type(m), "_apply_gate", _default_apply_gate) is _default_apply_gate


class Expert(nn.Module):
    def __init__(self, hidden: int, inter: int, device=None, dtype=None):
        super().__init__()
        kw = dict(bias=False, device=device, dtype=dtype)
        self.gate_proj = nn.Linear(hidden, inter, **kw)
        self.up_proj = nn.Linear(hidden, inter, **kw)
        self.down_proj = nn.Linear(inter, hidden, **kw)


class ExpertLinears(nn.ModuleList):
    """A sparse block's experts as Linear layers (expert e is child `e`); forward(hidden,
    top_k_index, top_k_weights) as transformers' fused experts compute it."""

    def __init__(self, fused: nn.Module):
        gu, down = fused.gate_up_proj, fused.down_proj
        if any(getattr(fused, n, None) is not None for n in ("gate_up_proj_bias", "down_proj_bias")):
            raise UnsupportedArchitectureError(f"{type(fused).__name__}: experts with biases are not supported yet")
        n, two_inter, hidden = gu.shape
        inter = two_inter // 2
        if tuple(down.shape) != (n, hidden, inter):
            raise UnsupportedArchitectureError(f"{type(fused).__name__}: expert shapes {tuple(gu.shape)} / "
                                               f"{tuple(down.shape)} are not the gate_up / down layout modelpress reads")
        super().__init__(Expert(hidden, inter, device=gu.device, dtype=gu.dtype) for _ in range(n))
        self.num_experts = n
        self._act = [fused.act_fn]  # in a list: a Module attribute would become a child (and an "expert")
        if gu.device.type != "meta":
            with torch.no_grad():
                for e, ex in enumerate(self):
                    ex.gate_proj.weight.copy_(gu[e, :inter])
                    ex.up_proj.weight.copy_(gu[e, inter:])
                    ex.down_proj.weight.copy_(down[e])
        # the original module, weightless, to rebuild the fused layout from (fuse_experts)
        self._fused = [fused.to("meta")]

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        out = torch.zeros_like(hidden_states)
        act = self._act[0]
        for e, ex in enumerate(self):
            token_idx, pos = torch.where(top_k_index == e)
            if token_idx.numel() == 0:
                continue
            x = hidden_states[token_idx]
            h = act(ex.gate_proj(x)) * ex.up_proj(x)
            y = ex.down_proj(h) * top_k_weights[token_idx, pos, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out

    def fused(self) -> nn.Module:
        """The transformers module with these experts' current weights, fused again."""
        f = self._fused[0]
        w = self[0].gate_proj.weight
        f = f.to_empty(device=w.device).to(w.dtype)
        with torch.no_grad():
            f.gate_up_proj.copy_(torch.stack([torch.cat([ex.gate_proj.weight, ex.up_proj.weight]) for ex in self]))
            f.down_proj.copy_(torch.stack([ex.down_proj.weight for ex in self]))
        return f


def unfuse_experts(model: nn.Module) -> int:
    """Replace every fused experts module of `model` by ExpertLinears, in place; returns how many.
    Fused experts of another layout stay as they are (dense, not units), with a warning."""
    others = {type(m).__name__ for m in model.modules() if looks_fused(m) and not is_fused_experts(m)}
    if others:
        log.warning("the experts of %s keep transformers' fused layout (their gate or weights are laid out "
                    "otherwise than Mixtral's): they stay dense", ", ".join(sorted(others)))
    found = [(name, m) for name, m in model.named_modules() if is_fused_experts(m)]
    for name, m in found:
        replace_module(model, name, ExpertLinears(m))
    return len(found)


def fuse_experts(model: nn.Module) -> list[tuple[nn.Module, str, ExpertLinears]]:
    """Put fused transformers modules back in place of ExpertLinears (weights copied); returns
    what `restore` needs to undo it."""
    done = []
    for name, m in list(model.named_modules()):
        if isinstance(m, ExpertLinears):
            done.append((replace_module(model, name, m.fused()), name.rpartition(".")[2], m))
    return done


def restore(done: list[tuple[nn.Module, str, ExpertLinears]]) -> None:
    """Undo `fuse_experts` (the fused copies are freed)."""
    for owner, attr, m in done:
        setattr(owner, attr, m)
        m._fused[0].to("meta")


def expert_of(unit: str) -> bool:
    """Whether a unit is a routed expert's projection (…experts.<e>.gate_proj)."""
    parts = unit.split(".")
    return len(parts) >= 3 and parts[-3] == "experts" and parts[-2].isdigit()
