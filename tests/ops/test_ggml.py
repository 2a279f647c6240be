import pytest
import torch

from modelpress.errors import ConfigError
from modelpress.export import llamacpp
from modelpress.ops.ggmlweight import GGMLWeight
from tests.conftest import correlated_inputs


@pytest.mark.parametrize("t", ["Q2_K", "Q3_K", "Q4_K", "Q4_0", "Q5_1"])
def test_importance_matrix_lowers_activation_weighted_error(t):
    if not llamacpp.available():
        pytest.skip("quantizing with an importance matrix needs llama.cpp's library")
    x = correlated_inputs(4096, 256, outliers=2)
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    im = (x * x).mean(0)

    def err(g):
        return float(((g.dequantize() - w) @ x.T).pow(2).sum())

    plain, weighted = GGMLWeight.quantize(w, t), GGMLWeight.quantize(w, t, imatrix=im)
    assert weighted.data.shape == plain.data.shape  # the same type and bytes per row, other choices inside
    assert err(weighted) < 0.6 * err(plain)
    with pytest.raises(ConfigError, match="has 256 entries"):
        GGMLWeight.quantize(w, t, imatrix=im[:128])
