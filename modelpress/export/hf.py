"""Plain Hugging Face export: dequantized weights that `AutoModelForCausalLM.from_pretrained`
loads without modelpress. Dropped sub-blocks become all-zero weights (they add nothing)."""
from __future__ import annotations

from pathlib import Path

import torch

from ..models.moe import fuse_experts, restore
from ..utils.io import atomic_dir
from .checkpoint import empty_model


@torch.no_grad()
def export_hf(model, tokenizer, out_dir: str | Path, dtype: torch.dtype = torch.float16) -> Path:
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    plain = empty_model(config, dtype)
    fused = fuse_experts(model)  # a MoE's experts in the layout transformers loads
    try:
        have = {k: v.clone() if fused else v for k, v in model.state_dict().items()}
    finally:
        restore(fused)
    sd = {}
    for name, t in plain.state_dict().items():
        sd[name] = have[name].to(dtype) if name in have else torch.zeros_like(t)
    plain.load_state_dict(sd)
    plain.tie_weights()
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        plain.save_pretrained(str(tmp), safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return out_dir
