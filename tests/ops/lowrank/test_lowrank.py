import pytest
import torch

from modelpress.errors import ConfigError
from modelpress.ops import OPERATORS
from tests.conftest import layer_problem, rel_out_err


def _lowrank_weight(seed=0):
    # a weight with a decaying spectrum, like trained layers
    w, x, st = layer_problem(seed=seed)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    w = (u * (s * torch.logspace(0, -1.5, s.numel()))) @ vh
    return w, x, st


@pytest.mark.parametrize("method", ["svd", "asvd"])
def test_error_decreases_monotonically_with_rank(method):
    w, x, st = _lowrank_weight()
    errs = [rel_out_err(w, OPERATORS.build(method, rank=r).compress(w, st).dequantize(), x) for r in (2, 4, 8, 16, 32, 64)]
    assert all(a > b for a, b in zip(errs, errs[1:])), errs


@pytest.mark.parametrize("rank", [4, 16, 32])
def test_activation_aware_beats_plain_svd(rank):
    w, x, st = _lowrank_weight(seed=1)
    plain = rel_out_err(w, OPERATORS.build("svd", rank=rank).compress(w, st).dequantize(), x)
    aware = rel_out_err(w, OPERATORS.build("asvd", rank=rank).compress(w, st).dequantize(), x)
    assert aware < 0.8 * plain, (aware, plain)


def test_factors_are_the_whole_storage():
    w, x, st = _lowrank_weight()
    pw = OPERATORS.build("asvd", rank=8).compress(w, st)
    assert pw.nbytes() == 2 * 8 * (w.shape[0] + w.shape[1])
    assert pw.lr_b.shape == (w.shape[0], 8) and pw.lr_a.shape == (8, w.shape[1])
    assert OPERATORS.build("svd", rank_ratio=0.5).compress(w, None).lr_b.shape[1] == int(
        0.5 * w.numel() / sum(w.shape))


def test_bad_rank_settings():
    with pytest.raises(ConfigError):
        OPERATORS.build("svd")
    with pytest.raises(ConfigError):
        OPERATORS.build("svd", rank=4, rank_ratio=0.5)
