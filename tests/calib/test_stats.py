import pytest
import torch

from modelpress.calib.stats import LinearStats, symmetrize_, syrk_upper_


@pytest.mark.parametrize("width,leaf", [(7, 288), (577, 288), (1536, 100), (130, 1)])
def test_upper_triangle_accumulation_equals_full_product(width, leaf):
    g = torch.Generator().manual_seed(width)
    x1, x2 = torch.randn(50, width, generator=g), torch.randn(30, width, generator=g)
    acc = torch.zeros(width, width)
    syrk_upper_(acc, x1, leaf=leaf)
    syrk_upper_(acc, x2, leaf=leaf)
    full = x1.t() @ x1 + x2.t() @ x2
    assert torch.allclose(torch.triu(acc), torch.triu(full), rtol=1e-4, atol=1e-3)
    symmetrize_(acc)
    assert torch.equal(acc, acc.t())  # exactly symmetric, so Cholesky sees a symmetric matrix
    assert torch.allclose(acc, full, rtol=1e-4, atol=1e-3)


def test_wide_layer_stats_are_symmetric_xtx():
    st = LinearStats(700, want_xtx=True)
    x = torch.randn(64, 700)
    st.add(x)
    assert torch.equal(st.xtx, st.xtx.t())
    assert torch.allclose(st.xtx, x.t() @ x, rtol=1e-4, atol=1e-3)
    assert torch.allclose(st.sqnorm, (x * x).sum(0), rtol=1e-4)
