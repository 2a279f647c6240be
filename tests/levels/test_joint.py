import torch

import modelpress as mp
from modelpress.allocate.budget import Budget, make_problem
from modelpress.search import allocate, materialize, open_database
from tests.conftest import tiny_model
from tests.export.test_checkpoint import windows

JK = dict(bits=(2, 3, 4), sparsity=(0.0, 0.5), ranks=(0, 4), group_size=16, allow_drop=True)


def test_joint_database_is_pareto_and_search_meets_byte_budget(tmp_path):
    w = windows()
    m = tiny_model("llama")
    ref = tiny_model("llama")
    db = open_database(m, None, "joint", data=w, db=tmp_path / "db", **JK)
    for u in db.units:
        vals = db.values(u)
        metas = [db.level_meta(u, v) for v in vals]
        assert all(a["nbytes"] < b["nbytes"] and a["error"] > b["error"] for a, b in zip(metas, metas[1:]))
        assert vals[0] == "drop"
    p = make_problem(db, Budget("mb", 0.3))
    mid = (db.meta["fixed_bytes"] + (p.min_cost() + p.max_cost()) / 2) / 1e6
    budget = Budget("mb", mid)
    res = allocate(m, db, budget, "evolutionary", data=w, generations=6, offspring=6, tokens=(32, 64))
    prob = make_problem(db, budget)
    choice = res.plan.choice(prob)
    assert prob.cost(choice) <= prob.budget and prob.slack_ok(choice)
    assert len({v.split("-")[0] for v in res.plan.levels.values()}) > 1  # mixed bit-widths
    c = materialize(m, None, db, res.plan)
    c.save(tmp_path / "ck")
    assert (tmp_path / "ck" / "weights.safetensors").stat().st_size <= mid * 1e6
    with torch.no_grad():
        assert torch.equal(m(w.eval).logits, mp.load_compressed(tmp_path / "ck")(w.eval).logits)
    assert mp.evaluate(m, w.eval, reference=ref).kl < 1.0
