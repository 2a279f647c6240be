"""The importance matrix llama.cpp's quantizers take: for every Linear layer, the mean of x² over
calibration tokens per input column, measured on the dense model's inputs (what `llama-imatrix`
collects from the model it is given)."""
from __future__ import annotations

import torch

from .driver import calibrate


def importance(model, ids: torch.Tensor, *, batch_size: int = 8, device=None) -> dict[str, torch.Tensor]:
    """Layer name -> (in_features,) float32 mean of x² over the tokens of `ids` (on the CPU).

    Only the decoder blocks' layers: the output projection (tied to the embedding in many small
    models) is quantized without one."""
    out: dict[str, torch.Tensor] = {}

    def keep(name, _mod, st) -> None:
        out[name] = (st.sqnorm / max(st.n, 1)).float().cpu()

    calibrate(model, ids, keep, stats="norms", sequential=False, batch_size=batch_size, device=device,
              desc="importance matrix")
    return out
