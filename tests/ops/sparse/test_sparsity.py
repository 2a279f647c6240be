import pytest
import torch

from modelpress.errors import ConfigError
from modelpress.ops import OPERATORS
from tests.conftest import layer_problem, rel_out_err

METHODS = ("magnitude", "wanda", "sparsegpt")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.95])
def test_exact_unstructured_sparsity(method, sparsity):
    w, x, st = layer_problem()
    pw = OPERATORS.build(method, sparsity=sparsity).compress(w, st)
    expect = round(sparsity * w.numel())
    if method == "sparsegpt" and sparsity == 0.0:
        assert pw.mask is None
        return
    assert int((~pw.mask).sum()) == expect
    assert int((pw.dequantize() == 0).sum()) >= expect


@pytest.mark.parametrize("method", METHODS)
def test_exact_prune_count(method):
    w, x, st = layer_problem()
    pw = OPERATORS.build(method, n_prune=1234).compress(w, st)
    assert int((~pw.mask).sum()) == 1234


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_nm_masks_exact(method, pattern):
    n, m = map(int, pattern.split(":"))
    w, x, st = layer_problem()
    mask = OPERATORS.build(method, pattern=pattern).compress(w, st).mask
    per_group = mask.reshape(w.shape[0], -1, m).sum(-1)
    assert torch.all(per_group == n)


def test_error_ranking_at_50_percent():
    w, x, st = layer_problem()
    err = {m: rel_out_err(w, OPERATORS.build(m, sparsity=0.5).compress(w, st).dequantize(), x) for m in METHODS}
    assert err["sparsegpt"] < 0.7 * err["magnitude"], err
    assert err["wanda"] < err["magnitude"], err


def test_sparsegpt_beats_magnitude_2_4():
    w, x, st = layer_problem()
    e_mag = rel_out_err(w, OPERATORS.build("magnitude", pattern="2:4").compress(w, st).dequantize(), x)
    e_sgpt = rel_out_err(w, OPERATORS.build("sparsegpt", pattern="2:4").compress(w, st).dequantize(), x)
    assert e_sgpt < 0.7 * e_mag


def test_sparsegpt_joint_quantization():
    w, x, st = layer_problem()
    pw = OPERATORS.build("sparsegpt", sparsity=0.5, bits=4, group_size=64).compress(w, st)
    assert pw.bits == 4 and int((~pw.mask).sum()) == w.numel() // 2
    assert pw.codes.numel() == w.numel() // 2
    assert rel_out_err(w, pw.dequantize(), x) < 0.2


@pytest.mark.parametrize("kw", [dict(sparsity=0.99), dict(pattern="4:2"), dict(pattern="x"), dict(),
                                dict(sparsity=0.5, pattern="2:4")])
def test_bad_targets_rejected(kw):
    with pytest.raises(ConfigError):
        OPERATORS.build("wanda", **kw)


@pytest.mark.parametrize("target", [dict(sparsity=0.5), dict(sparsity=0.7), dict(pattern="2:4")])
def test_refit_lowers_output_error_on_the_same_mask(target):
    w, x, st = layer_problem()
    plain = OPERATORS.build("sparsegpt", refit_iters=0, **target).compress(w, st)
    refit = OPERATORS.build("sparsegpt", **target).compress(w, st)
    assert torch.equal(plain.mask, refit.mask)
    assert torch.all(refit.dequantize()[~refit.mask] == 0)
    e_plain = rel_out_err(w, plain.dequantize(), x)
    e_refit = rel_out_err(w, refit.dequantize(), x)
    assert e_refit < 0.8 * e_plain, (e_plain, e_refit)


def test_refit_solves_the_masked_least_squares_problem():
    """Checked against a direct solve of each row's normal equations on its support."""
    from modelpress.ops.obs import refit_masked

    w, x, st = layer_problem(out_f=8, in_f=48)
    mask = torch.rand(w.shape, generator=torch.Generator().manual_seed(0)) > 0.5
    h = st.hessian.double()
    h = h + 0.01 * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    got = refit_masked(w, st.hessian, mask, torch.zeros_like(w), iters=200, tol=1e-7)
    for r in range(w.shape[0]):
        s = mask[r]
        want = torch.linalg.solve(h[s][:, s], (w[r].double() @ h)[s])
        assert torch.allclose(got[r, s].double(), want, rtol=1e-3, atol=1e-5)
        assert torch.all(got[r, ~s] == 0)


def test_bad_refit_setting():
    with pytest.raises(ConfigError):
        OPERATORS.build("sparsegpt", sparsity=0.5, refit_iters=-1)
