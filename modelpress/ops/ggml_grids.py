"""GGML types as grids a column-by-column quantizer (GPTQ) can round onto.

A `Grid` gives each run of `group` columns its parameters by the type's own rule, applied to
those columns as the sweep has updated them when it reaches the run; every weight is then rounded
to the nearest value those parameters can represent, and `encode` writes the type's exact bytes,
so llama.cpp decodes what the sweep evaluated.

- Legacy block-32 types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0): d (and m) by ggml's reference rule, as
  arithmetic here (quantize_row_*_ref), so they work without llama.cpp's library.
- K-quants (Q2_K … Q6_K, super-blocks of 256): the scale bytes come from ggml's own quantizer
  (optionally weighted by an importance vector, as `llama-quantize --imatrix`); only the code bits
  are rewritten. Each type decodes a code q affinely (d·sc·q − dmin·m, or d·sc·(q − offset)), so
  a weight's grid is read off llama.cpp's decoder by decoding the scale bytes with every code 0
  and every code at its maximum. Where the code bits sit in a block is the type's layout in
  ggml-quants.c (dequantize_row_q*_K); tests check it against ggml's own bytes.
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from ..errors import ConfigError
from . import ggml

# ---- legacy block-32 types -----------------------------------------------------------------------
# value = (code - offset) * d for the symmetric types, code * d + m for the "_1" types; d and m are
# float16 in the file.
LEGACY_GRID = {"Q4_0": (4, 8), "Q5_0": (5, 16), "Q8_0": (8, None), "Q4_1": (4, None), "Q5_1": (5, None)}


def legacy_params(t: str, block: torch.Tensor):
    """ggml's rule for one block-32 group of every row: (d, m) as float32 holding float16 values
    (m is None for the symmetric types). `block` is (rows, 32)."""
    bits, offset = LEGACY_GRID[t]
    if t.endswith("_1"):
        lo, hi = block.min(dim=1).values, block.max(dim=1).values
        d = (hi - lo) / ((1 << bits) - 1)
        return d.half().float(), lo.half().float()
    amax_at = block.abs().argmax(dim=1, keepdim=True)
    signed_max = block.gather(1, amax_at).squeeze(1)
    d = signed_max.abs() / 127 if t == "Q8_0" else signed_max / -offset
    return d.half().float(), None


def legacy_codes(t: str, w, d, m):
    """Codes of weights `w` (rows,) on the grid (d, m) of each row: the nearest grid value, clamped."""
    bits, offset = LEGACY_GRID[t]
    safe = torch.where(d == 0, torch.ones_like(d), d)
    if m is not None:
        return torch.round((w - m) / safe).clamp_(0, (1 << bits) - 1)
    if t == "Q8_0":
        return torch.round(w / safe).clamp_(-127, 127)
    return (torch.round(w / safe) + offset).clamp_(0, (1 << bits) - 1)


def legacy_values(t: str, codes, d, m):
    _, offset = LEGACY_GRID[t]
    if m is not None:
        return codes * d + m
    return codes * d if offset is None else (codes - offset) * d


def encode_legacy(t: str, d: np.ndarray, m: np.ndarray | None, codes: np.ndarray) -> np.ndarray:
    """GGUF bytes of a legacy-type matrix from its per-block d (and m) and codes: d, m (rows,
    n_blocks) float16-representable; codes (rows, n) integers. uint8 (rows, bytes_per_row)."""
    rows, n = codes.shape
    nb = n // 32
    q = codes.reshape(rows, nb, 32)
    parts = [np.asarray(d, dtype=np.float16).reshape(rows, nb, 1).view(np.uint8)]
    if m is not None:
        parts.append(np.asarray(m, dtype=np.float16).reshape(rows, nb, 1).view(np.uint8))
    if t == "Q8_0":
        parts.append(q.astype(np.int8).view(np.uint8))
    else:
        q = q.astype(np.uint32)
        if LEGACY_GRID[t][0] == 5:
            high = ((q >> 4) & 1) << np.arange(32, dtype=np.uint32)
            parts.append(high.sum(axis=2, dtype=np.uint32).astype("<u4").reshape(rows, nb, 1).view(np.uint8))
        parts.append(((q[..., :16] & 0xF) | ((q[..., 16:] & 0xF) << 4)).astype(np.uint8))
    out = np.concatenate(parts, axis=2).reshape(rows, -1)
    assert out.shape[1] == ggml.bytes_per_row(ggml.qtype(t), n), (t, out.shape)
    return out


# ---- K-quants: where each code's bits sit in a 256-weight super-block ----------------------------
KQUANT_CODE_BITS = {"Q2_K": 2, "Q3_K": 3, "Q4_K": 4, "Q5_K": 5, "Q6_K": 6}


@functools.lru_cache(maxsize=None)
def code_layout(t: str) -> tuple[tuple[np.ndarray, np.ndarray, int, int, int], ...]:
    """The code bits of type t as pieces (elements, bytes, bit shift in the byte, width, shift in
    the code): bits [code_shift, code_shift + width) of element e's code are stored at bit `shift`
    of byte `bytes[i]` of the block. Within one piece every byte and every element appears once,
    so a piece packs or unpacks with one vectorised step."""
    pieces: dict[tuple[int, int, int], list[tuple[int, int]]] = {}

    def put(e, byte, shift, width, code_shift=0):
        pieces.setdefault((shift, width, code_shift), []).append((e, byte))

    if t in ("Q2_K", "Q3_K"):  # two halves of 128; 2-bit fields at shift 2j of 32 (Q2_K: 16 + 32h) bytes
        qs = 16 if t == "Q2_K" else 32
        for h in range(2):
            for j in range(4):
                for p in range(2):
                    for ll in range(16):
                        e = 128 * h + 32 * j + 16 * p + ll
                        put(e, qs + 32 * h + 16 * p + ll, 2 * j, 2)
                        if t == "Q3_K":  # the third bit in hmask[32], bit 4h + j
                            put(e, 16 * p + ll, 4 * h + j, 1, 2)
    elif t in ("Q4_K", "Q5_K"):  # 64-weight chunks: low nibbles, then high nibbles of 32 bytes
        qs = 16 if t == "Q4_K" else 48
        for k in range(4):
            for s in range(2):
                for ll in range(32):
                    e = 64 * k + 32 * s + ll
                    put(e, qs + 32 * k + ll, 4 * s, 4)
                    if t == "Q5_K":  # the fifth bit in qh[32], bit 2k + s
                        put(e, 16 + ll, 2 * k + s, 1, 4)
    elif t == "Q6_K":  # ql[128] nibbles and qh[64] 2-bit fields, two halves of 128
        for h in range(2):
            for g in range(4):
                for ll in range(32):
                    e = 128 * h + 32 * g + ll
                    put(e, 64 * h + 32 * (g & 1) + ll, 4 * (g >> 1), 4)
                    put(e, 128 + 32 * h + ll, 2 * g, 2, 4)
    else:
        raise ConfigError(f"no code layout for {t!r}; K-quants are {', '.join(KQUANT_CODE_BITS)}")
    out = []
    for (shift, width, code_shift), eb in pieces.items():
        e, b = (np.array(v) for v in zip(*eb))
        assert len(set(e.tolist())) == len(e) and len(set(b.tolist())) == len(b), (t, shift, code_shift)
        out.append((e, b, shift, width, code_shift))
    return tuple(out)


def pack_codes(t: str, codes: np.ndarray, block_bytes: int) -> np.ndarray:
    """The code bits of (..., 256) codes as (..., block_bytes) bytes, every other bit 0."""
    out = np.zeros(codes.shape[:-1] + (block_bytes,), dtype=np.uint8)
    codes = codes.astype(np.uint8)
    for e, b, shift, width, code_shift in code_layout(t):
        out[..., b] |= ((codes[..., e] >> code_shift) & ((1 << width) - 1)) << shift
    return out


def unpack_codes(t: str, data: np.ndarray) -> np.ndarray:
    """(..., block_bytes) blocks -> (..., 256) codes."""
    codes = np.zeros(data.shape[:-1] + (256,), dtype=np.uint8)
    for e, b, shift, width, code_shift in code_layout(t):
        codes[..., e] |= ((data[..., b] >> shift) & ((1 << width) - 1)) << code_shift
    return codes


# ---- grids ---------------------------------------------------------------------------------------
class Grid:
    """Protocol of a type's grid for a sweep over the columns of one (rows, n) matrix."""

    group: int

    def start(self, col: int, block: torch.Tensor) -> None:
        """Fix the parameters of columns col .. col + group from `block` (rows, group)."""
        raise NotImplementedError

    def round(self, col: int, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes, values) of column `col`'s weights `w` (rows,) on the parameters fixed for it."""
        raise NotImplementedError

    def encode(self, codes: np.ndarray) -> np.ndarray:
        """The type's bytes (rows, bytes_per_row) for the codes (rows, n) chosen on this grid."""
        raise NotImplementedError


class LegacyGrid(Grid):
    group = 32

    def __init__(self, t: str, rows: int, n: int, device=None):
        self.t = t
        self.d = torch.zeros(rows, n // 32, device=device)
        self.m = torch.zeros(rows, n // 32, device=device) if t.endswith("_1") else None
        self._d = self._m = None

    def start(self, col, block):
        self._d, self._m = legacy_params(self.t, block)
        self.d[:, col // 32] = self._d
        if self._m is not None:
            self.m[:, col // 32] = self._m

    def round(self, col, w):
        codes = legacy_codes(self.t, w, self._d, self._m)
        return codes, legacy_values(self.t, codes, self._d, self._m)

    def encode(self, codes):
        return encode_legacy(self.t, self.d.cpu().numpy(), None if self.m is None else self.m.cpu().numpy(), codes)


class KQuantGrid(Grid):
    """A K-quant's grid: ggml's quantizer sets each super-block's scale bytes (weighted by
    `importance`, the per-column mean x², when given); codes are rounded onto the affine grid
    those bytes decode to."""

    group = 256

    def __init__(self, t: str, rows: int, n: int, importance: np.ndarray | None = None, device=None):
        if t not in KQUANT_CODE_BITS:
            raise ConfigError(f"{t!r} is not a K-quant ({', '.join(KQUANT_CODE_BITS)})")
        self.t, self.qt = t, ggml.qtype(t)
        ggml.check_supported(self.qt, n)  # whole 256-weight super-blocks, and llama.cpp's library
        self.size = ggml.bytes_per_row(self.qt, 256)
        self.qmax = (1 << KQUANT_CODE_BITS[t]) - 1
        self.code_bits = pack_codes(t, np.full(256, self.qmax), self.size)
        self.data = np.zeros((rows, n // 256, self.size), dtype=np.uint8)
        self.importance = None if importance is None else np.asarray(importance, dtype=np.float32)
        self.device = device
        self._col = 0
        self._step = self._base = None

    def start(self, col, block):
        rows = block.shape[0]
        imp = None if self.importance is None else self.importance[col:col + 256]
        data = ggml.quantize(block.float().cpu().numpy(), self.qt, imatrix=imp)
        scale_bytes = data & ~self.code_bits
        self.data[:, col // 256] = scale_bytes
        lo = ggml.dequantize(scale_bytes, self.qt, (rows, 256))
        hi = ggml.dequantize(scale_bytes | self.code_bits, self.qt, (rows, 256))
        # grid of weight (r, j): base + step * q, q = 0 .. qmax; qmax-wide probe keeps step's rounding small
        self._base = torch.from_numpy(lo).to(self.device)
        self._step = torch.from_numpy((hi - lo) / self.qmax).to(self.device)
        self._col = col

    def round(self, col, w):
        j = col - self._col
        step, base = self._step[:, j], self._base[:, j]
        safe = torch.where(step == 0, torch.ones_like(step), step)
        codes = torch.where(step == 0, torch.zeros_like(w), torch.round((w - base) / safe)).clamp_(0, self.qmax)
        return codes, base + step * codes

    def encode(self, codes):
        rows, n = codes.shape
        packed = pack_codes(self.t, codes.reshape(rows, n // 256, 256), self.size)
        return (self.data | packed).reshape(rows, -1)


def grid(t: str, rows: int, n: int, importance=None, device=None) -> Grid:
    """The grid of GGML type `t` for a (rows, n) matrix."""
    t = t.upper()
    if t in LEGACY_GRID:
        if n % 32:
            raise ConfigError(f"{t} stores rows of whole 32-weight blocks, not {n}")
        return LegacyGrid(t, rows, n, device=device)
    if t in KQUANT_CODE_BITS:
        return KQuantGrid(t, rows, n, importance=importance, device=device)
    raise ConfigError(f"GPTQ on a GGML grid takes {', '.join([*LEGACY_GRID, *KQUANT_CODE_BITS])}, not {t!r}")
