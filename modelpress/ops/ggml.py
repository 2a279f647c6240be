"""GGML quantization with llama.cpp's own arithmetic.

llama.cpp's ggml library (found or fetched by `export.llamacpp`) is loaded with ctypes and
`ggml_quantize_chunk` / the type traits' `to_float` are used: the bytes modelpress writes are the
bytes llama.cpp's quantizer would write, and the floats modelpress evaluates are the ones
llama.cpp decodes. Where no llama.cpp library can be had, the `gguf` package's NumPy port is used,
which covers only the legacy block-32 types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) plus F16/F32.
"""
from __future__ import annotations

import ctypes
import functools
import logging

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gq

from ..errors import ConfigError

log = logging.getLogger(__name__)

LEGACY = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
KQUANTS = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


class _Traits(ctypes.Structure):
    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64), ("blck_size_interleave", ctypes.c_int64),
                ("type_size", ctypes.c_size_t), ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p),
                ("from_float_ref", ctypes.c_void_p)]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


@functools.lru_cache(maxsize=1)
def _libggml():
    from ..export import llamacpp

    try:
        lib = llamacpp.library().base
    except llamacpp.LlamaCppUnavailable as e:
        log.warning("K-quant GGML types are unavailable (%s); legacy types use the gguf package's NumPy port", e)
        return None
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_Traits)
    # the traits struct's layout must match this library: check it against gguf's table
    t = lib.ggml_get_type_traits(int(GGMLQuantizationType.Q4_K)).contents
    if (t.blck_size, t.type_size) != GGML_QUANT_SIZES[GGMLQuantizationType.Q4_K]:
        log.warning("the ggml library has an unexpected type-traits layout; using the gguf package")
        return None
    return lib


def _why_unavailable() -> str:
    from ..export import llamacpp

    return llamacpp.unavailable_reason() or "its ggml library has an unexpected layout"


def backend() -> str:
    return "llama.cpp (ggml)" if _libggml() is not None else "gguf (numpy, legacy types only)"


def qtype(name: str) -> GGMLQuantizationType:
    try:
        return GGMLQuantizationType[name.upper()]
    except KeyError:
        raise ConfigError(f"unknown GGML type {name!r}; e.g. {', '.join(LEGACY + KQUANTS)}") from None


def bytes_per_row(t: GGMLQuantizationType, n_per_row: int) -> int:
    block, size = GGML_QUANT_SIZES[t]
    return n_per_row // block * size


def supported(t: GGMLQuantizationType, n_per_row: int) -> bool:
    """Whether rows of n_per_row weights can be stored as type t here."""
    block, _ = GGML_QUANT_SIZES[t]
    if n_per_row % block:
        return False
    if t in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        return True
    lib = _libggml()
    if lib is None:
        return t.name in LEGACY
    return not lib.ggml_quantize_requires_imatrix(int(t))


def check_supported(t: GGMLQuantizationType, n_per_row: int) -> None:
    """A clear error where rows of n_per_row weights cannot be stored as type t here."""
    if not supported(t, n_per_row):
        raise ConfigError(f"type {t.name} cannot store rows of {n_per_row} weights here"
                          + ("" if _libggml() else f" (K-quants need llama.cpp's library: {_why_unavailable()})"))


def quantize(w: np.ndarray, t: GGMLQuantizationType, imatrix: np.ndarray | None = None) -> np.ndarray:
    """Quantize a float32 (rows, n_per_row) matrix; returns uint8 (rows, bytes_per_row).

    `imatrix` (n_per_row,): the importance of each input column, the mean of x² over calibration
    tokens (what llama.cpp's importance matrix holds); ggml's quantizers then choose scales that
    minimise the error weighted by it, as `llama-quantize --imatrix` does."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    rows, n = w.shape
    check_supported(t, n)
    if t == GGMLQuantizationType.F32:
        return w.view(np.uint8).reshape(rows, -1).copy()
    if t == GGMLQuantizationType.F16:
        return w.astype(np.float16).view(np.uint8).reshape(rows, -1).copy()
    lib = _libggml()
    if imatrix is not None:
        imatrix = np.ascontiguousarray(imatrix, dtype=np.float32)
        if imatrix.shape != (n,):
            raise ConfigError(f"an importance matrix for rows of {n} weights has {n} entries, not {imatrix.shape}")
        if lib is None:
            raise ConfigError(f"quantizing with an importance matrix needs llama.cpp's library: {_why_unavailable()}")
    if lib is None:
        return np.ascontiguousarray(gq.quantize(w, t))
    out = np.empty((rows, bytes_per_row(t, n)), dtype=np.uint8)
    written = lib.ggml_quantize_chunk(int(t), w.ctypes.data, out.ctypes.data, 0, rows, n,
                                      None if imatrix is None else imatrix.ctypes.data)
    assert written == out.nbytes, (written, out.nbytes)
    return out


def dequantize(data: np.ndarray, t: GGMLQuantizationType, shape: tuple[int, int]) -> np.ndarray:
    """float32 (rows, n_per_row) decoded exactly as llama.cpp decodes it."""
    rows, n = shape
    data = np.ascontiguousarray(data, dtype=np.uint8)
    if t == GGMLQuantizationType.F32:
        return data.view(np.float32).reshape(rows, n).copy()
    if t == GGMLQuantizationType.F16:
        return data.view(np.float16).astype(np.float32).reshape(rows, n)
    lib = _libggml()
    if lib is None:
        return gq.dequantize(data.reshape(rows, -1), t).reshape(rows, n).astype(np.float32)
    out = np.empty((rows, n), dtype=np.float32)
    to_float = _TO_FLOAT(lib.ggml_get_type_traits(int(t)).contents.to_float)
    to_float(data.ctypes.data, out.ctypes.data, rows * n)
    return out
