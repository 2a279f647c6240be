import os

import pytest
import torch

import modelpress as mp
from modelpress.allocate.budget import Budget, make_problem
from modelpress.allocate.plan import Plan
from modelpress.errors import BudgetError, ConfigError
from modelpress.search import allocate, load_plan, materialize, open_database
from tests.conftest import tiny_model
from tests.export.test_checkpoint import windows

CASES = [("quant", dict(levels=(2, 3, 4), group_size=16), Budget("bits", 2.6)),
         ("sparsity", dict(max_sparsity=0.8, max_levels=6), Budget("sparsity", 0.45)),
         ("depth", {}, Budget("drop", 2))]


@pytest.mark.parametrize("kind,ks,budget", CASES)
def test_apply_plan_save_reload_identical(tmp_path, kind, ks, budget):
    w = windows()
    m = tiny_model("llama")
    db = open_database(m, None, kind, data=w, db=tmp_path / "db", **ks)
    res = allocate(m, db, budget, "dp")
    levels = set(map(str, res.plan.levels.values()))
    assert len(levels) > 1  # really mixed
    c = materialize(m, None, db, res.plan)
    c.save(tmp_path / "ck")
    res.plan.save(tmp_path / "ck" / "plan.json")
    back = mp.load_compressed(tmp_path / "ck")
    with torch.no_grad():
        assert torch.equal(m(w.eval).logits, back(w.eval).logits)
    assert load_plan(tmp_path / "ck" / "plan.json", db).levels == res.plan.levels


def test_plan_rejects_unknown_units_and_levels(tmp_path):
    w = windows()
    db = open_database(tiny_model("llama"), None, "quant", data=w, db=tmp_path / "db", levels=(2, 3), group_size=16)
    good = Plan("quant", {u: 3 for u in db.units})
    good.validate(db)
    with pytest.raises(ConfigError, match="unknown units: model.layers.9.mlp.up_proj"):
        Plan("quant", {**good.levels, "model.layers.9.mlp.up_proj": 3}).validate(db)
    bad = dict(good.levels)
    bad[next(iter(bad))] = 7
    with pytest.raises(ConfigError, match="level 7"):
        Plan("quant", bad).validate(db)
    with pytest.raises(ConfigError, match="no level for 1 units"):
        Plan("quant", dict(list(good.levels.items())[1:])).validate(db)
    with pytest.raises(ConfigError, match="kind"):
        Plan("sparsity", good.levels).validate(db)
    (tmp_path / "x.json").write_text("{]")
    with pytest.raises(ConfigError, match="plan is corrupt"):
        Plan.load(tmp_path / "x.json")


def test_budget_errors(tmp_path):
    w = windows()
    db = open_database(tiny_model("llama"), None, "quant", data=w, db=tmp_path / "db", levels=(2, 3), group_size=16)
    with pytest.raises(BudgetError, match="outside the database levels"):
        make_problem(db, Budget("bits", 4))
    with pytest.raises(BudgetError, match="does not apply"):
        make_problem(db, Budget("sparsity", 0.5))
    with pytest.raises(BudgetError, match="below the smallest model"):
        make_problem(db, Budget("mb", 0.01))
    with pytest.raises(BudgetError, match="unknown budget"):
        Budget("flops", 1)


def test_mb_budget_holds_on_disk(tmp_path):
    w = windows()
    m = tiny_model("llama")
    db = open_database(m, None, "quant", data=w, db=tmp_path / "db", levels=(2, 3, 4), group_size=16)
    lo = make_problem(db, Budget("mb", 10)).min_cost()
    target = (db.meta["fixed_bytes"] + lo * 1.25) / 1e6 + 0.01
    res = allocate(m, db, Budget("mb", target), "dp")
    materialize(m, None, db, res.plan).save(tmp_path / "ck")
    assert os.path.getsize(tmp_path / "ck" / "weights.safetensors") <= target * 1e6


def test_mb_budget_counts_headers_tightly(tmp_path):
    """The size budget counts each level's own header entries (an upper bound a few bytes per tensor
    above the real header) instead of a flat allowance per unit: at exactly the file size of uniform
    3-bit, the all-3-bit plan is over by only those few bytes."""
    from modelpress.allocate.budget import Budget, make_problem
    from modelpress.search import open_database
    from modelpress.allocate.plan import Plan
    from modelpress.search import materialize
    from tests.conftest import tiny_model
    from tests.export.test_checkpoint import windows

    w = windows()
    m = tiny_model("llama")
    db = open_database(m, None, "quant", data=w, db=tmp_path / "db", levels=(2, 3, 4), group_size=16)
    plan = Plan(kind="quant", levels={u: 3 for u in db.units})
    materialize(m, None, db, plan).save(tmp_path / "ck")
    size = (tmp_path / "ck" / "weights.safetensors").stat().st_size
    p = make_problem(db, Budget("mb", size / 1e6))
    all3 = [db.values(u).index(3) for u in p.units]
    n_tensors = 4 * len(p.units) + db.meta["fixed_tensors"]
    # an upper bound (a plan within the budget is never larger than the target), off by a few bytes per tensor
    assert 0 <= p.cost(all3) - p.budget <= 8 * n_tensors
    # the flat allowance (160 B per tensor, 4 per unit + 8) was far off
    assert p.budget - (size - db.meta["fixed_bytes"] - 160 * (4 * len(p.units) + 8)) > 4 * n_tensors
