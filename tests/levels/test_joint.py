import pytest
import torch

import modelpress as mp
from modelpress.allocate.budget import Budget, make_problem
from modelpress.errors import ConfigError
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
    res = search_mid_budget_and_round_trip(db, m, w, tmp_path, generations=6, offspring=6)
    assert len({v.split("-")[0] for v in res.plan.levels.values()}) > 1  # mixed bit-widths
    assert mp.evaluate(m, w.eval, reference=ref).kl < 1.0


def search_mid_budget_and_round_trip(db, m, w, tmp_path, **evo):
    """Evolutionary search of a byte-costed database halfway between its smallest and largest plan:
    the plan meets the budget (less than a level step below), its checkpoint file is no larger,
    and reloading it gives identical logits. Leaves `m` compressed; returns the search result."""
    p = make_problem(db, Budget("mb", 1.0))
    mid = (db.meta["fixed_bytes"] + (p.min_cost() + p.max_cost()) / 2) / 1e6
    budget = Budget("mb", mid)
    res = allocate(m, db, budget, "evolutionary", data=w, tokens=(32, 64), **evo)
    prob = make_problem(db, budget)
    choice = res.plan.choice(prob)
    assert prob.cost(choice) <= prob.budget and prob.slack_ok(choice)
    c = materialize(m, None, db, res.plan)
    c.save(tmp_path / "ck")
    assert (tmp_path / "ck" / "weights.safetensors").stat().st_size <= mid * 1e6
    with torch.no_grad():
        assert torch.equal(m(w.eval).logits, mp.load_compressed(tmp_path / "ck")(w.eval).logits)
    return res


SEQ = dict(bits=(2, 3), sparsity=(0.0,), ranks=(0, 4), group_size=16)


def test_sequential_joint_levels_see_compressed_inputs(tmp_path):
    """With sequential_level="w3", level w3 of every layer is what uniform sequential 3-bit GPTQ
    makes (the layer saw inputs of the 3-bit model before it); with dense inputs it is not."""
    w = windows()
    m = tiny_model("llama")
    seq = open_database(m, None, "joint", data=w, db=tmp_path / "seq", sequential_level="w3", **SEQ)
    flat = open_database(tiny_model("llama"), None, "joint", data=w, db=tmp_path / "flat", **SEQ)
    c = mp.compress(tiny_model("llama"), None, "gptq", data=w, bits=3, group_size=16)  # the operator's defaults
    same_as_flat = 0
    for u, pw in c.units.items():
        assert torch.equal(seq.load(u, "w3").dequantize(), pw.dequantize())
        same_as_flat += torch.equal(flat.load(u, "w3").dequantize(), pw.dequantize())
    assert same_as_flat <= 3  # only the first block's q/k/v see the same inputs either way
    ref = tiny_model("llama")  # the model the sequential build ran on is left dense
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), ref.state_dict().values()))


def test_sequential_joint_build_resumes(tmp_path, monkeypatch):
    from tests.levels.test_database import interrupt_build

    w = windows()
    full = open_database(tiny_model("llama"), None, "joint", data=w, db=tmp_path / "full", sequential_level="w3", **SEQ)
    interrupt_build(monkeypatch, 10, lambda: open_database(tiny_model("llama"), None, "joint", data=w, db=tmp_path / "db",
                                                           sequential_level="w3", **SEQ))
    db = open_database(tiny_model("llama"), None, "joint", data=w, db=tmp_path / "db", sequential_level="w3", **SEQ)
    for u in db.units:
        for v in db.values(u):
            assert torch.equal(db.load(u, v).dequantize(), full.load(u, v).dequantize()), (u, v)


def test_sequential_level_must_be_a_level():
    with pytest.raises(ConfigError, match="not one of the levels"):
        open_database(tiny_model("llama"), None, "joint", data=windows(), sequential_level="w5", **SEQ)
