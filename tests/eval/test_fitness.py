import numpy as np
import pytest

import modelpress as mp
from modelpress.allocate.budget import Budget, make_problem
from modelpress.eval.fitness import KLFitness
from modelpress.levels import PlanState
from modelpress.search import open_database
from tests.conftest import tiny_model
from tests.export.test_checkpoint import windows


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    w = windows()
    m = tiny_model("llama", layers=4)
    db = open_database(m, None, "quant", data=w, db=tmp_path_factory.mktemp("db"), levels=(2, 3, 4), group_size=16)
    p = make_problem(db, Budget("bits", 3))
    return w, m, db, p


def _fit(setup, **kw):
    w, m, db, p = setup
    return KLFitness(m, PlanState(m, db), p, w.calib, **kw)


def test_exact_kl_matches_evaluate(setup):
    w, m, db, p = setup
    f = _fit(setup, topk=10**6)
    choice = [1] * len(p.units)
    ref = tiny_model("llama", layers=4)
    score = f(choice, tuple(range(len(w.calib))))
    f._apply(choice)
    assert score == pytest.approx(mp.evaluate(m, w.calib, reference=ref).kl, rel=1e-4)


def test_topk_is_a_close_lower_bound(setup):
    exact = _fit(setup, topk=10**6)
    approx = _fit(setup, topk=64)
    choice = [0] * len(setup[3].units)
    s = tuple(range(4))
    e, a = exact(choice, s), approx(choice, s)
    assert a <= e * (1 + 1e-4) and a > 0.5 * e


def test_prefix_reuse_is_exact_and_cheaper(setup):
    p = setup[3]
    rng = np.random.default_rng(0)
    fast, slow = _fit(setup, reuse_prefix=True), _fit(setup, reuse_prefix=False)
    parent = [1] * len(p.units)
    s = fast.new_sample(64, rng)
    for u in (len(p.units) - 1, len(p.units) // 2, 0):
        child = list(parent)
        child[u] = 2
        assert fast(child, s, parent=parent) == pytest.approx(slow(child, s, parent=parent), rel=1e-5, abs=1e-9)
    assert fast(parent, s, parent=parent) == pytest.approx(slow(parent, s), rel=1e-5)
    # per candidate, fewer blocks are run (the parent's run is shared by all its offspring)
    assert fast.blocks_run - 4 * len(s) < slow.blocks_run
