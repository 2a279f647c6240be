"""What the compute device does fast, detected once."""
from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def _cpu_bf16() -> bool:
    cpu = getattr(torch, "cpu", None)
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        fn = getattr(cpu, probe, None)
        try:
            if fn is not None and fn():
                return True
        except Exception:  # a probe this torch build lacks or cannot run
            continue
    return False


def fast_bf16(device: torch.device | str) -> bool:
    """Does `device` run bfloat16 matmuls faster than float32? CUDA devices that support bf16 do;
    a CPU does when it has AMX tiles or AVX512-BF16 (on this project's CI machine: 2.4x for a
    SmolLM2-135M forward); other CPUs emulate bf16 and are slower in it."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return _cpu_bf16()
    return False
