import pytest
import torch

from modelpress.errors import ConfigError
from modelpress.ops import OPERATORS
from modelpress.ops.quant.grid import find_params, quantize
from tests.conftest import layer_problem, rel_out_err


def test_error_falls_with_bits():
    w, x, st = layer_problem()
    errs = [rel_out_err(w, OPERATORS.build("rtn", bits=b, group_size=64).compress(w, None).dequantize(), x)
            for b in (2, 3, 4, 6, 8)]
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 1e-4


def test_ragged_last_group():
    # 144 = 2 x 64 + 16: the last group has 16 columns and its own scale
    w, x, st = layer_problem(in_f=144)
    pw = OPERATORS.build("rtn", bits=4, group_size=64).compress(w, None)
    assert pw.scales.shape == (96, 3)
    assert rel_out_err(w, pw.dequantize(), x) < 0.02


def test_codes_in_range_and_sym_zero_fixed():
    w, _, _ = layer_problem()
    for sym in (False, True):
        pw = OPERATORS.build("rtn", bits=3, group_size=32, sym=sym).compress(w, None)
        assert int(pw.codes.max()) <= 7
        assert (pw.zeros is None) == sym


def test_mse_clipping_reduces_weighted_error():
    w, x, st = layer_problem()
    plain = OPERATORS.build("rtn", bits=2, group_size=64).compress(w, st).dequantize()
    clip = OPERATORS.build("rtn", bits=2, group_size=64, mse=True).compress(w, st).dequantize()
    assert rel_out_err(w, clip, x) < rel_out_err(w, plain, x)


def test_scales_are_float16_exact():
    w = torch.randn(4, 64) * 1e-3
    s, z = find_params(w, 4, False)
    assert torch.equal(s, s.half().float())
    q = quantize(w, s, z, 4)
    assert q.min() >= 0 and q.max() <= 15


@pytest.mark.parametrize("bad", [1, 9, 3.5])
def test_bad_bits_rejected(bad):
    with pytest.raises(ConfigError, match="bits"):
        OPERATORS.build("rtn", bits=bad)


def test_unknown_setting_rejected():
    with pytest.raises(ConfigError, match="no setting sparsity"):
        OPERATORS.build("rtn", sparsity=0.5)
