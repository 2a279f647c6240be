"""GGML grids: the legacy types' arithmetic and the K-quants' code layouts against ggml's own bytes."""
import numpy as np
import pytest
import torch

from modelpress.errors import ConfigError
from modelpress.export import llamacpp
from modelpress.ops import ggml, ggml_grids

needs_llama = pytest.mark.skipif(not llamacpp.available(), reason="K-quants need llama.cpp's library")


@pytest.mark.parametrize("t", list(ggml_grids.LEGACY_GRID))
def test_encoded_blocks_decode_to_the_grid_values(t):
    w = torch.randn(8, 64)
    d, m = zip(*(ggml_grids.legacy_params(t, w[:, i:i + 32]) for i in (0, 32)))
    d = torch.stack(d, 1)
    m = None if m[0] is None else torch.stack(m, 1)
    dd, mm = d.repeat_interleave(32, 1), None if m is None else m.repeat_interleave(32, 1)
    codes = ggml_grids.legacy_codes(t, w, dd, mm)
    data = ggml_grids.encode_legacy(t, d.numpy(), None if m is None else m.numpy(), codes.numpy().astype(np.int64))
    decoded = ggml.dequantize(data, ggml.qtype(t), (8, 64))  # llama.cpp's own decoder where it is available
    assert np.array_equal(decoded, ggml_grids.legacy_values(t, codes, dd, mm).numpy())
    # ggml's scales, nearest value on the decoded grid: never further from w than ggml's own rounding
    theirs = ggml.dequantize(ggml.quantize(w.numpy(), ggml.qtype(t)), ggml.qtype(t), (8, 64))
    assert np.all(np.abs(decoded - w.numpy()) <= np.abs(theirs - w.numpy()) + 1e-7)


@pytest.mark.parametrize("t", list(ggml_grids.KQUANT_CODE_BITS))
def test_code_layout_covers_each_code_bit_once(t):
    size = ggml.bytes_per_row(ggml.qtype(t), 256)
    bits = ggml_grids.KQUANT_CODE_BITS[t]
    mask = ggml_grids.pack_codes(t, np.full(256, (1 << bits) - 1), size)
    assert int(np.unpackbits(mask).sum()) == 256 * bits  # no code bit is stored twice or lost
    codes = np.random.default_rng(0).integers(0, 1 << bits, (3, 256))
    assert np.array_equal(ggml_grids.unpack_codes(t, ggml_grids.pack_codes(t, codes, size)), codes)


@needs_llama
@pytest.mark.parametrize("t", list(ggml_grids.KQUANT_CODE_BITS))
def test_k_quant_codes_read_off_ggml_bytes_are_what_llama_cpp_decodes(t):
    """Unpacking ggml's own bytes by the layout and decoding each code on the probed affine grid
    gives llama.cpp's decode; re-packing those codes onto the scale bytes gives ggml's bytes back.
    A wrong layout (say, Q6_K's nibbles swapped) fails both."""
    qt = ggml.qtype(t)
    w = np.random.default_rng(1).standard_normal((8, 512)).astype(np.float32)
    data = ggml.quantize(w, qt)
    grid = ggml_grids.KQuantGrid(t, 8, 512)
    for col in (0, 256):
        grid.start(col, torch.from_numpy(w[:, col:col + 256]))
        codes = ggml_grids.unpack_codes(t, data.reshape(8, 2, -1)[:, col // 256])
        ours = grid._base + grid._step * torch.from_numpy(codes.astype(np.float32))
        theirs = ggml.dequantize(data, qt, (8, 512))[:, col:col + 256]
        assert np.allclose(ours.numpy(), theirs, rtol=1e-5, atol=1e-6 * np.abs(theirs).max())
    codes = ggml_grids.unpack_codes(t, data.reshape(8, 2, -1)).reshape(8, 512)
    assert np.array_equal(grid.encode(codes), data)


@needs_llama
@pytest.mark.parametrize("t", list(ggml_grids.KQUANT_CODE_BITS))
def test_k_quant_rounding_never_errs_more_than_ggml(t):
    """On ggml's scales, the nearest grid value is at least as close as ggml's chosen code."""
    qt = ggml.qtype(t)
    w = torch.randn(16, 256)
    grid = ggml_grids.KQuantGrid(t, 16, 256)
    grid.start(0, w)
    codes = torch.stack([grid.round(j, w[:, j])[0] for j in range(256)], 1)
    ours = ggml.dequantize(grid.encode(codes.numpy()), qt, (16, 256))
    theirs = ggml.dequantize(ggml.quantize(w.numpy(), qt), qt, (16, 256))
    assert np.all(np.abs(ours - w.numpy()) <= np.abs(theirs - w.numpy()) + 1e-6)


def test_grid_errors():
    with pytest.raises(ConfigError, match="takes Q4_0"):
        ggml_grids.grid("IQ2_XS", 4, 256)
    with pytest.raises(ConfigError, match="whole 32-weight blocks"):
        ggml_grids.grid("Q4_0", 4, 48)
    with pytest.raises(ConfigError, match="cannot store rows of 288"):
        ggml_grids.grid("Q4_K", 4, 288)
