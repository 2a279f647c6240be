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


def test_validation_windows_are_never_sampled_and_score_a_plan(setup):
    w, _, db, p = setup
    m = tiny_model("llama", layers=4)  # dense: the module's model carries the other tests' plans
    state = PlanState(m, db)
    f = KLFitness(m, state, p, w.calib[:5], validation=w.calib[5:8])
    only_val = KLFitness(m, state, p, w.calib[5:8])
    rng = np.random.default_rng(0)
    for _ in range(20):
        assert max(f.new_sample(32 * 5, rng)) < 5  # only fitness windows
    choice = [0] * len(p.units)
    v = f.validate(choice)
    assert v == pytest.approx(only_val(choice, (0, 1, 2)), rel=1e-5)  # KL on exactly those windows
    assert f.validate(choice) == v and f.first_validation == v
    assert f.validate([2] * len(p.units)) < v  # 4 bits everywhere is closer to dense than 2 bits
    assert KLFitness(m, state, p, w.calib[:5]).validate(choice) is None


def test_search_records_validation_kl_per_generation(setup):
    from modelpress.search import SearchSettings, allocate

    w, _, db, p = setup
    m = tiny_model("llama", layers=4)
    res = allocate(m, db, Budget("bits", 3), "evolutionary", data=w, settings=SearchSettings(fitness_windows=5,
                   validation_windows=3), generations=3, offspring=3, tokens=(32, 64), survivors=(2, 1))
    assert len(res.history) == 3 and all(h["validation"] > 0 for h in res.history)
    assert res.fitness_stats["validation_windows"] == 3
    assert res.fitness_stats["start_validation"] > 0
    # the plan returned is the parent with the lowest validation KL, the start included
    best = min([res.fitness_stats["start_validation"]] + [h["validation"] for h in res.history])
    assert res.fitness_stats["final_validation"] == pytest.approx(best)
    gen = res.fitness_stats["selected_generation"]
    assert 0 <= gen <= 3
    for a, b in zip(res.history, res.history[1:]):  # an unchanged parent keeps its validation score
        if not b["improved"]:
            assert b["validation"] == a["validation"]
