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


def test_16_bit_products_are_summed_in_float32():
    """Many small batches: bf16 products rounded once per batch stay within 1e-2 of the exact sum;
    a bf16 running sum (the bug this guards against) stalls far outside it."""
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(16, 24, generator=g) + 1.0 for _ in range(2000)]  # a mean: the sum grows large
    st = LinearStats(24, want_xtx=True, product_dtype=torch.bfloat16)
    exact = torch.zeros(24, 24, dtype=torch.float64)
    bad = torch.zeros(24, 24, dtype=torch.bfloat16)
    for x in xs:
        st.add(x)
        exact += x.double().t() @ x.double()
        bad += x.bfloat16().t() @ x.bfloat16()
    rel = lambda a: float((a.double() - exact).norm() / exact.norm())  # noqa: E731
    assert st.xtx.dtype == torch.float32
    assert rel(st.xtx) < 1e-2
    assert rel(bad) > 0.1


def test_stats_inside_an_autocast_forward_stay_float32():
    st = LinearStats(8, want_xtx=True)
    x = torch.randn(32, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        st.add(x)
    assert torch.allclose(st.xtx, x.t() @ x, rtol=1e-5, atol=1e-5)  # float32 products, not bf16
