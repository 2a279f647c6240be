import pytest
import torch

from modelpress.calib.stats import LinearStats
from modelpress.ops import OPERATORS
from modelpress.ops.base import output_error
from tests.conftest import layer_problem, rel_out_err


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_beats_rtn_on_correlated_inputs(bits):
    w, x, st = layer_problem()
    rtn = rel_out_err(w, OPERATORS.build("rtn", bits=bits, group_size=64).compress(w, None).dequantize(), x)
    gptq = rel_out_err(w, OPERATORS.build("gptq", bits=bits, group_size=64).compress(w, st).dequantize(), x)
    assert gptq < 0.7 * rtn, (gptq, rtn)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("sym", [False, True])
def test_gptq_variants_ragged_group(act_order, sym):
    # 576 columns with group 128: 4 full groups and a ragged one of 64 (SmolLM2's shape)
    w, x, st = layer_problem(out_f=64, in_f=576, n=4096)
    op = OPERATORS.build("gptq", bits=4, group_size=128, act_order=act_order, sym=sym)
    pw = op.compress(w, st)
    assert pw.scales.shape == (64, 5)
    assert (pw.perm is not None) == act_order
    w_hat = pw.dequantize()
    assert rel_out_err(w, w_hat, x) < 0.01
    # the analytic error from H agrees with the data
    assert output_error(w, w_hat, st.hessian) == pytest.approx(rel_out_err(w, w_hat, x), rel=1e-3)


def test_gptq_per_row_and_dead_columns():
    w, x, st = layer_problem()
    x[:, 5] = 0  # a dead input column
    st = LinearStats(w.shape[1], want_xtx=True)
    st.add(x)
    pw = OPERATORS.build("gptq", bits=4, group_size=None).compress(w, st)
    w_hat = pw.dequantize()
    assert pw.scales.shape == (w.shape[0], 1)
    assert torch.all(w_hat[:, 5] == 0)
    assert rel_out_err(w, w_hat, x) < 0.02


def test_gptq_is_deterministic():
    w, x, st = layer_problem()
    a = OPERATORS.build("gptq", bits=3).compress(w, st).dequantize()
    b = OPERATORS.build("gptq", bits=3).compress(w, st).dequantize()
    assert torch.equal(a, b)


def test_shrunk_hessian_sits_between_gptq_and_a_diagonal_hessian():
    """On the calibration inputs, output error grows with the shrink (less fit to them), and a
    diagonal Hessian (shrink 1) is still no worse than plain rounding."""
    w, x, st = layer_problem()
    errs = [rel_out_err(w, OPERATORS.build("gptq", bits=3, group_size=64, shrink=s, mse=False)
                        .compress(w, st).dequantize(), x) for s in (0.0, 0.3, 1.0)]
    rtn = rel_out_err(w, OPERATORS.build("rtn", bits=3, group_size=64).compress(w, None).dequantize(), x)
    assert errs[0] < errs[1] < errs[2] <= rtn * 1.05, (errs, rtn)
    with pytest.raises(Exception, match="shrink"):
        OPERATORS.build("gptq", shrink=2.0)


def test_clipping_weighted_by_activations_runs_and_differs():
    w, x, st = layer_problem()
    a = OPERATORS.build("gptq", bits=3, group_size=64, clip_by="activations").compress(w, st).dequantize()
    b = OPERATORS.build("gptq", bits=3, group_size=64).compress(w, st).dequantize()
    rtn = OPERATORS.build("rtn", bits=3, group_size=64).compress(w, None).dequantize()
    assert not torch.equal(a, b) and rel_out_err(w, a, x) < 0.7 * rel_out_err(w, rtn, x)
    with pytest.raises(Exception, match="clip_by"):
        OPERATORS.build("gptq", clip_by="bytes")


def test_bf16_forwards_give_the_same_gptq_codes():
    """XᵀX from bf16 forwards (summed in float32) changes < 1% of the codes of a block's layers
    and not the quality; with the act-order permutation, near-ties in diag(H) may reorder columns,
    so the defaults are compared by output error instead."""
    from modelpress.calib import LayerwiseRunner
    from modelpress.models.arch import get_weight
    from modelpress.utils.device import compute_dtype
    from tests.conftest import tiny_model

    m = tiny_model("llama", layers=1)
    ids = torch.randint(0, 256, (16, 128), generator=torch.Generator().manual_seed(0))

    def stats(dt):
        with compute_dtype(dt):
            step = next(iter(LayerwiseRunner(m, ids, batch_size=4, sequential=False).blocks()))
            return step.collect("xtx")

    s32, s16 = stats("float32"), stats("bfloat16")
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.o_proj", "model.layers.0.mlp.gate_proj"]
    exact = OPERATORS.build("gptq", bits=4, group_size=32, act_order=False, mse=False)
    default = OPERATORS.build("gptq", bits=4, group_size=32)
    mods = dict(m.named_modules())
    for n in names:
        w = get_weight(mods[n]).float()
        a, b = exact.compress(w, s32[n]), exact.compress(w, s16[n])
        assert (a.codes == b.codes).float().mean() >= 0.99, n
        e32 = output_error(w, default.compress(w, s32[n]).dequantize(), s32[n].hessian)
        e16 = output_error(w, default.compress(w, s16[n]).dequantize(), s32[n].hessian)
        assert e16 < 1.05 * e32, n


@pytest.mark.parametrize("sym", [False, True])
def test_static_groups_keep_column_order_and_most_of_act_orders_gain(sym):
    """static_groups: act-order's sweep, groups as runs of columns in the original order (no
    permutation stored, what compressed-tensors holds); its error lies near act-order's, below
    plain GPTQ's or at most a little above it, and far below RTN's."""
    w, x, st = layer_problem(out_f=64, in_f=512, n=4096)
    err = {}
    for name, kw in {"plain": dict(act_order=False), "act": dict(act_order=True),
                     "static": dict(act_order=True, static_groups=True)}.items():
        pw = OPERATORS.build("gptq", bits=3, group_size=64, sym=sym, **kw).compress(w, st)
        if name == "static":
            assert pw.perm is None and pw.scales.shape == (64, 8)
            assert torch.equal(pw.group_index(), torch.arange(512) // 64)
        err[name] = rel_out_err(w, pw.dequantize(), x)
    rtn = rel_out_err(w, OPERATORS.build("rtn", bits=3, group_size=64, sym=sym).compress(w, None).dequantize(), x)
    assert err["static"] < 0.7 * rtn and err["static"] < 1.15 * err["plain"], (err, rtn)
    assert OPERATORS.build("gptq", bits=3, group_size=64, static_groups=True).compress(w, st).perm is None
