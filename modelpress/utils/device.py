"""What the compute device does fast, detected once, and the dtype the model's forwards run in.

The compute dtype applies to the model's *forwards* only (calibration, fitness, evaluation,
KV-cache runs). They run under `torch.autocast`, so a float32 model keeps float32 weights and
the matmuls run on the matrix units in bfloat16; everything numerically delicate stays float32:
XᵀX sums (calib.stats), Cholesky / OBS sweeps, SVDs, log-softmax, KL and perplexity sums.
`compute_dtype("auto")` (the default) is bfloat16 where the device does it fast, else float32.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import logging

import torch

from ..errors import ConfigError

log = logging.getLogger(__name__)

_NAMES = {"auto": None, "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
COMPUTE_DTYPES = ("auto", "bfloat16", "float16", "float32")

# None = auto. Read only outside greenlets (calib.streaming sets torch's autocast state itself).
_ACTIVE: contextvars.ContextVar[torch.dtype | None] = contextvars.ContextVar("modelpress_compute_dtype", default=None)


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


def parse_compute_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """"auto" / None -> None (decided per device); a name or torch dtype -> that dtype."""
    if dtype is None or isinstance(dtype, torch.dtype):
        if isinstance(dtype, torch.dtype) and dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ConfigError(f"compute dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {dtype}")
        return dtype
    try:
        return _NAMES[str(dtype).lower()]
    except KeyError:
        raise ConfigError(f"unknown compute dtype {dtype!r}; use one of {', '.join(COMPUTE_DTYPES)}") from None


def resolve_compute_dtype(dtype: str | torch.dtype | None, device: torch.device | str) -> torch.dtype:
    """The dtype a float32 model's forwards run in on `device`."""
    dt = parse_compute_dtype(dtype)
    if dt is not None:
        return dt
    return torch.bfloat16 if fast_bf16(device) else torch.float32


@contextlib.contextmanager
def compute_dtype(dtype: str | torch.dtype | None):
    """Run the model's forwards inside this block in `dtype` ("auto", "bfloat16", "float16",
    "float32"); None leaves the current setting (nested calls pass their argument through)."""
    if dtype is None:
        yield
        return
    token = _ACTIVE.set(parse_compute_dtype(dtype) if str(dtype).lower() != "auto" else None)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


_compute_dtype_context = compute_dtype  # for wrappers whose keyword of the same name shadows it


def active_compute_dtype(device: torch.device | str) -> torch.dtype:
    return resolve_compute_dtype(_ACTIVE.get(), device)


def _param(model_or_param) -> torch.Tensor:
    return model_or_param if torch.is_tensor(model_or_param) else next(model_or_param.parameters())


def forward_dtype(model_or_param) -> torch.dtype:
    """What a forward of this model computes in now: the compute dtype for a float32 model, the
    model's own dtype for a model already held in 16 bits (its weights are not cast again)."""
    p = _param(model_or_param)
    if p.dtype != torch.float32:
        return p.dtype
    return active_compute_dtype(p.device)


def forward_dtype_name(model_or_param) -> str:
    """`forward_dtype` as recorded in plans and level databases ("bfloat16", "float32", ...)."""
    return str(forward_dtype(model_or_param)).removeprefix("torch.")


def weights_dtype_name(model_or_param) -> str:
    """The dtype the weights are held in ("float32", or "bfloat16" for a 16-bit folder loaded or
    streamed as it is)."""
    return str(_param(model_or_param).dtype).removeprefix("torch.")


def forwards(model_or_param):
    """Context for a model forward: autocast to the compute dtype, or nothing in float32.

    The autocast weight cache is off: weights change between forwards (levels applied by a
    search, layers compressed mid-pass) and a cached cast would be stale."""
    p = _param(model_or_param)
    dt = forward_dtype(p)
    if dt == p.dtype:  # float32 compute, or a model already in 16 bits
        return contextlib.nullcontext()
    return torch.autocast(p.device.type, dtype=dt, cache_enabled=False)


def full_precision(device: torch.device | str):
    """Leave autocast for numerically delicate work done inside a forward (statistics, GPTQ)."""
    return torch.autocast(torch.device(device).type, enabled=False)


def takes_compute_dtype(fn):
    """Give a public function a `compute_dtype=` keyword ("auto", "bfloat16", "float16",
    "float32"; None keeps the caller's setting) that holds for every forward it runs."""

    @functools.wraps(fn)
    def wrapper(*args, compute_dtype: str | torch.dtype | None = None, **kwargs):
        with _compute_dtype_context(compute_dtype):
            return fn(*args, **kwargs)

    return wrapper
