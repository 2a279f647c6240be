"""GPTQ on llama.cpp's legacy grids: exact bytes llama.cpp decodes, lower output error than its quantizers."""
import numpy as np
import pytest
import torch

from modelpress.errors import ConfigError
from modelpress.ops import ggml
from modelpress.ops.ggmlweight import GGMLWeight, from_gguf_rows
from modelpress.ops.quant.gptq_ggml import GGMLGPTQ
from tests.conftest import layer_problem, rel_out_err


@pytest.mark.parametrize("t", list(ggml.LEGACY_GRID))
def test_encoded_blocks_decode_to_the_grid_values(t):
    w = torch.randn(8, 64)
    d, m = zip(*(ggml.legacy_params(t, w[:, i:i + 32]) for i in (0, 32)))
    d = torch.stack(d, 1)
    m = None if m[0] is None else torch.stack(m, 1)
    dd, mm = d.repeat_interleave(32, 1), None if m is None else m.repeat_interleave(32, 1)
    codes = ggml.legacy_codes(t, w, dd, mm)
    data = ggml.encode_legacy(t, d.numpy(), None if m is None else m.numpy(), codes.numpy().astype(np.int64))
    decoded = ggml.dequantize(data, ggml.qtype(t), (8, 64))  # llama.cpp's own decoder where it is available
    assert np.array_equal(decoded, ggml.legacy_values(t, codes, dd, mm).numpy())
    # ggml's scales, nearest value on the decoded grid: never further from w than ggml's own rounding
    theirs = ggml.dequantize(ggml.quantize(w.numpy(), ggml.qtype(t)), ggml.qtype(t), (8, 64))
    assert np.all(np.abs(decoded - w.numpy()) <= np.abs(theirs - w.numpy()) + 1e-7)


@pytest.mark.parametrize("t", list(ggml.LEGACY_GRID))
def test_gptq_on_the_grid_errs_less_than_llama_cpps_quantizers(t):
    w, x, st = layer_problem(out_f=64, in_f=256, n=4096)
    g = GGMLGPTQ(type=t).compress(w, st)
    plain = GGMLWeight.quantize(w, t)
    assert g.type == t and g.data.shape == plain.data.shape and g.chosen_by == "gptq"
    assert rel_out_err(w, g.dequantize(), x) < 0.3 * rel_out_err(w, plain.dequantize(), x)
    # q/k rows in llama.cpp's rotary order: the same rows, permuted (GPTQ treats rows alike)
    gh = GGMLGPTQ(type=t, heads=4).compress(w, st)
    assert torch.equal(gh.dequantize(), g.dequantize()) and not torch.equal(gh.data, g.data)
    assert torch.equal(from_gguf_rows(gh.gguf_rows(), 4), gh.dequantize())


def test_clear_errors():
    with pytest.raises(ConfigError, match="takes Q4_0"):
        GGMLGPTQ(type="Q4_K")
    w, _, st = layer_problem(out_f=8, in_f=48, n=256)
    with pytest.raises(ConfigError, match="whole 32-weight blocks"):
        GGMLGPTQ().compress(w, st)
