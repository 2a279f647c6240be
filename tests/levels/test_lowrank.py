"""Low-rank ranks as levels: exact byte costs, Pareto order, a search under a byte budget, round trip."""
import pytest
import torch

from modelpress.errors import ConfigError
from modelpress.ops import OPERATORS
from modelpress.ops.lowrank.factor import activation_aware, activation_aware_ranks
from modelpress.search import open_database
from tests.conftest import layer_problem, rel_out_err, tiny_model
from tests.export.test_checkpoint import windows
from tests.levels.test_joint import search_mid_budget_and_round_trip


@pytest.fixture(scope="module")
def lowrank_db(tmp_path_factory):
    w = windows()
    return open_database(tiny_model("llama"), None, "lowrank", data=w, db=tmp_path_factory.mktemp("db") / "db",
                         ratios=(0.1, 0.25, 0.5, 0.75))


def test_levels_cost_their_factors_and_get_better_with_rank(lowrank_db):
    db = lowrank_db
    for u, info in db.units.items():
        out_f, in_f = info.shape
        vals = db.values(u)
        metas = [db.level_meta(u, v) for v in vals]
        for v, m in zip(vals, metas):
            assert m["nbytes"] == (2 * out_f * in_f if v == "dense" else 2 * int(v[1:]) * (out_f + in_f))
        # Pareto: every more expensive level is more accurate
        assert all(a["nbytes"] < b["nbytes"] and a["error"] > b["error"] for a, b in zip(metas, metas[1:]))
        assert vals[-1] == "dense" and metas[-1]["error"] < 1e-4  # float16 rounding only
        assert metas[0]["error"] > 1e-3  # the smallest rank really loses something


def test_one_svd_gives_the_activation_aware_factors_of_every_rank():
    """The database's shortcut (one SVD for all ranks) equals the asvd operator rank by rank."""
    w, x, st = layer_problem(seed=1)
    h = st.hessian
    both = activation_aware_ranks(w, h, [3, 10, 25])
    for r, (b, a) in both.items():
        b1, a1 = activation_aware(w, h, r)
        assert torch.allclose(b @ a, b1 @ a1, rtol=1e-4, atol=1e-4)
        pw = OPERATORS.build("asvd", rank=r).compress(w, st)
        assert rel_out_err(w, pw.dequantize(), x) == pytest.approx(rel_out_err(w, b @ a, x), rel=1e-2)


def test_search_meets_the_byte_budget_and_round_trips(lowrank_db, tmp_path):
    res = search_mid_budget_and_round_trip(lowrank_db, tiny_model("llama"), windows(), tmp_path,
                                           generations=4, offspring=4)
    assert len(set(res.plan.levels.values())) > 1  # mixed ranks


def test_bad_ratios():
    with pytest.raises(ConfigError, match="shares of the dense bytes"):
        open_database(tiny_model("llama"), None, "lowrank", data=windows(), ratios=(0.5, 1.5))
