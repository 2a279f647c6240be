"""GPTQ on llama.cpp's grids: exact bytes llama.cpp decodes, lower output error than its quantizers."""
import pytest
import torch

from modelpress.errors import ConfigError
from modelpress.export import llamacpp
from modelpress.ops import ggml_grids
from modelpress.ops.ggmlweight import GGMLWeight, from_gguf_rows
from modelpress.ops.quant.gptq_ggml import GGMLGPTQ
from tests.conftest import layer_problem, rel_out_err


@pytest.mark.parametrize("t", list(ggml_grids.LEGACY_GRID))
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


@pytest.mark.skipif(not llamacpp.available(), reason="K-quants need llama.cpp's library")
@pytest.mark.parametrize("t", list(ggml_grids.KQUANT_CODE_BITS))
def test_gptq_on_k_quant_grids_errs_less_than_llama_cpp_with_an_imatrix(t):
    """Against llama.cpp's quantizer given the same importance (diag XᵀX/n), on a layer with
    correlated inputs: the OBS update is what it lacks."""
    w, x, st = layer_problem(out_f=64, in_f=512, n=4096)
    g = GGMLGPTQ(type=t).compress(w, st)
    imatrix = GGMLWeight.quantize(w, t, imatrix=torch.diagonal(st.hessian).float())
    assert g.type == t and g.data.shape == imatrix.data.shape
    assert rel_out_err(w, g.dequantize(), x) < 0.6 * rel_out_err(w, imatrix.dequantize(), x)
    assert rel_out_err(w, GGMLGPTQ(type=t, importance=False).compress(w, st).dequantize(), x) < \
        rel_out_err(w, GGMLWeight.quantize(w, t).dequantize(), x)


def test_clear_errors():
    with pytest.raises(ConfigError, match="takes Q4_0"):
        GGMLGPTQ(type="IQ2_XS")
    w, _, st = layer_problem(out_f=8, in_f=48, n=256)
    with pytest.raises(ConfigError, match="whole 32-weight blocks"):
        GGMLGPTQ().compress(w, st)
