import numpy as np
import pytest
import torch

import modelpress as mp
from modelpress.errors import BudgetError, CheckpointError
from modelpress.export.bitstack import BitStackConfig, build_bitstack, decompose, load_bitstack, size_range_mb
from tests.conftest import layer_problem, tiny_model
from tests.export.test_checkpoint import windows


def test_each_block_reduces_the_error():
    w, x, st = layer_problem()
    _, blocks, errors = decompose(w, st.hessian, BitStackConfig(max_blocks=6, rank=2))
    assert len(blocks) == 6 and all(a > b for a, b in zip(errors, errors[1:]))
    assert errors[-1] < 0.05


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    d = tmp_path_factory.mktemp("bs") / "bs"
    manifest = build_bitstack(tiny_model("llama"), None, windows(), d, BitStackConfig(max_blocks=6, rank=2))
    return d, manifest


def test_more_memory_never_worse_and_size_respected(stack):
    d, manifest = stack
    lo, hi = size_range_mb(manifest)
    ref = tiny_model("llama")
    w = windows()
    kls = []
    for mb in np.linspace(lo, hi, 7):
        m, _, info = load_bitstack(d, float(mb))
        assert info["size_mb"] <= mb + 1e-9
        kls.append(mp.evaluate(m, w.eval, reference=ref).kl)
    assert all(b <= a * (1 + 1e-6) for a, b in zip(kls, kls[1:])), kls
    assert kls[-1] < 0.2 * kls[0]


def test_load_compressed_dispatches_and_rejects(stack, tmp_path):
    d, manifest = stack
    lo, hi = size_range_mb(manifest)
    m = mp.load_compressed(d, max_memory_mb=(lo + hi) / 2)
    assert isinstance(m, torch.nn.Module)
    with pytest.raises(BudgetError, match="smallest model"):
        mp.load_compressed(d, max_memory_mb=lo * 0.9)
    c = mp.compress(tiny_model("llama"), None, "rtn", bits=4)
    c.save(tmp_path / "ck")
    with pytest.raises(BudgetError, match="only a BitStack"):
        mp.load_compressed(tmp_path / "ck", max_memory_mb=0.01)


def test_corrupt_bitstack_detected(stack, tmp_path):
    import shutil

    d, _ = stack
    bad = tmp_path / "bad"
    shutil.copytree(d, bad)
    p = bad / "weights.safetensors"
    p.write_bytes(p.read_bytes()[:-64])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_bitstack(bad, None)
