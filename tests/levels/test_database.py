import json

import pytest
import torch

import modelpress as mp
from modelpress.errors import ConfigError
from modelpress.levels import LevelDB, QuantKind
from modelpress.levels import database as dbmod
from modelpress.search import open_database
from tests.conftest import tiny_model
from tests.export.test_checkpoint import windows

QK = dict(levels=(2, 3, 4), group_size=16)


@pytest.fixture
def w():
    return windows()


def test_quant_database_complete_and_sensible(tmp_path, w):
    m = tiny_model("llama")
    db = open_database(m, None, "quant", data=w, db=tmp_path / "db", **QK)
    assert not db.missing() and len(db.units) == 21
    for u in db.units:
        errs = [db.level_meta(u, b)["error"] for b in (2, 3, 4)]
        assert errs[0] > errs[1] > errs[2] > 0
        for b in (2, 3, 4):
            pw = db.load(u, b)
            assert pw.bits == b and db.level_meta(u, b)["nbytes"] == pw.nbytes()
    # the model is left dense
    ref = tiny_model("llama")
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), ref.state_dict().values()))


def test_level_equals_uniform_sequential_gptq(tmp_path, w):
    """Built sequentially: level b of every unit is exactly what uniform b-bit GPTQ produces."""
    db = open_database(tiny_model("llama"), None, "quant", data=w, db=tmp_path / "db", **QK)
    c = mp.compress(tiny_model("llama"), None, "gptq", data=w, bits=3, group_size=16)
    for u, pw in c.units.items():
        assert torch.equal(db.load(u, 3).dequantize(), pw.dequantize())


def test_levels_on_one_reference_level(tmp_path, w):
    """sequential_level=3: one pass, every layer's levels computed on the inputs of the model whose earlier
    layers are 3-bit. Level 3 is then uniform sequential 3-bit GPTQ exactly, as in the per-level build; the
    other levels differ from the per-level build's (their inputs differ) except in the first block's q/k/v,
    which see the embeddings either way. Default settings keep their old database key."""
    per_level = open_database(tiny_model("llama"), None, "quant", data=w, db=tmp_path / "per", **QK)
    m = tiny_model("llama")
    shared = open_database(m, None, "quant", data=w, db=tmp_path / "ref", sequential_level=3, **QK)
    assert not shared.missing() and shared.kind.sequential_level == 3
    same = {2: 0, 3: 0, 4: 0}
    for u in shared.units:
        for b in (2, 3, 4):
            same[b] += torch.equal(shared.load(u, b).dequantize(), per_level.load(u, b).dequantize())
        errs = [shared.level_meta(u, b)["error"] for b in (2, 3, 4)]
        assert errs[0] > errs[1] > errs[2] > 0
    assert same[3] == len(shared.units) and same[2] <= 3 and same[4] <= 3
    ref = tiny_model("llama")  # the model is left dense
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), ref.state_dict().values()))
    assert "sequential_level" not in QuantKind(**QK).settings()
    with pytest.raises(ConfigError, match="not one of the levels"):
        QuantKind(sequential_level=7, **QK)


def test_reference_level_build_resumes(tmp_path, w, monkeypatch):
    full = open_database(tiny_model("llama"), None, "quant", data=w, db=tmp_path / "full", sequential_level=3, **QK)
    interrupt_build(monkeypatch, 9, lambda: open_database(tiny_model("llama"), None, "quant", data=w,
                                                          db=tmp_path / "db", sequential_level=3, **QK))
    db = open_database(tiny_model("llama"), None, "quant", data=w, db=tmp_path / "db", sequential_level=3, **QK)
    for u in db.units:
        for b in (2, 3, 4):
            assert torch.equal(db.load(u, b).dequantize(), full.load(u, b).dequantize()), (u, b)


class Boom(Exception):
    pass


def interrupt_build(monkeypatch, at: int, build) -> None:
    """Run `build`, killed (Boom) at its `at`-th store of levels."""
    calls = {"n": 0}
    real = dbmod.LevelDB.add_levels

    def dying(self, unit, new):
        calls["n"] += 1
        if calls["n"] == at:
            raise Boom
        return real(self, unit, new)

    monkeypatch.setattr(dbmod.LevelDB, "add_levels", dying)
    with pytest.raises(Boom):
        build()
    monkeypatch.setattr(dbmod.LevelDB, "add_levels", real)


def test_build_resumes_after_interruption(tmp_path, w, monkeypatch):
    full = open_database(tiny_model("llama"), None, "quant", data=w, db=tmp_path / "full", **QK)
    real = dbmod.LevelDB.add_levels
    interrupt_build(monkeypatch, 30, lambda: open_database(tiny_model("llama"), None, "quant", data=w,
                                                           db=tmp_path / "db", **QK))
    part = LevelDB.open_or_create(tmp_path / "db", tiny_model("llama"), QuantKind(**QK), w)
    n_missing = sum(len(v) for v in part.missing().values())
    assert 0 < n_missing < 63
    added = {"n": 0}

    def counting(self, unit, new):
        added["n"] += len(new)
        return real(self, unit, new)

    monkeypatch.setattr(dbmod.LevelDB, "add_levels", counting)
    db = open_database(tiny_model("llama"), None, "quant", data=w, db=tmp_path / "db", **QK)
    assert added["n"] == n_missing  # nothing finished was redone
    for u in db.units:
        for b in (2, 3, 4):
            assert torch.equal(db.load(u, b).dequantize(), full.load(u, b).dequantize())


def test_corrupt_unit_file_is_rebuilt(tmp_path, w):
    db = open_database(tiny_model("llama"), None, "quant", data=w, db=tmp_path / "db", **QK)
    unit = list(db.units)[5]
    f = db._file(unit)
    good = db.load(unit, 3).dequantize()
    data = bytearray(f.read_bytes())
    data[-20] ^= 0xFF
    f.write_bytes(bytes(data))
    db2 = LevelDB.open_or_create(tmp_path / "db", tiny_model("llama"), QuantKind(**QK), w)
    assert set(db2.missing()) == {unit}
    db3 = open_database(tiny_model("llama"), None, "quant", data=w, db=tmp_path / "db", **QK)
    assert not db3.missing()
    assert torch.equal(db3.load(unit, 3).dequantize(), good)


def test_database_mismatch_is_a_clear_error(tmp_path, w):
    open_database(tiny_model("llama"), None, "quant", data=w, db=tmp_path / "db", **QK)
    with pytest.raises(ConfigError, match="another model"):
        LevelDB.open_or_create(tmp_path / "db", tiny_model("llama", seed=3), QuantKind(**QK), w)
    with pytest.raises(ConfigError, match="other settings"):
        LevelDB.open_or_create(tmp_path / "db", tiny_model("llama"), QuantKind(levels=(2, 3)), w)


def test_sparsity_levels_use_equal_absolute_steps(tmp_path, w):
    db = open_database(tiny_model("llama"), None, "sparsity", data=w, db=tmp_path / "db", max_sparsity=0.8, max_levels=6)
    step = db.kind.step
    assert step > 0
    for u, info in db.units.items():
        vals = db.values(u)
        assert vals[-1] == 0 and all(a - b == step for a, b in zip(vals, vals[1:]))
        assert vals[0] <= 0.8 * info.numel
        for v in vals[:2]:
            pw = db.load(u, v)
            assert (0 if pw.mask is None else int((~pw.mask).sum())) == v
        assert 0 <= info.extra["outlier_ratio"] <= 1


def test_finished_sparsity_database_reopens(tmp_path, w):
    """The step is resolved from the model when the database is made; reopening with the default
    (unresolved) settings finds the same database instead of calling it 'built with other settings'."""
    m = tiny_model("llama")
    a = open_database(m, None, "sparsity", data=w, db=tmp_path / "db", max_levels=6)
    b = open_database(m, None, "sparsity", data=w, db=tmp_path / "db", max_levels=6)
    assert b.kind.step == a.kind.step and not b.missing()


def test_fingerprint_ignores_thread_count_and_sees_every_weight():
    m = tiny_model("llama")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = dbmod.model_fingerprint(m)
        torch.set_num_threads(max(2, threads))
        assert dbmod.model_fingerprint(m) == one
    finally:
        torch.set_num_threads(threads)
    w = m.model.layers[-1].mlp.down_proj.weight
    with torch.no_grad():
        w.view(-1)[-1] = torch.nextafter(w.view(-1)[-1], torch.tensor(1e9))  # one ulp, past the first bytes
    assert dbmod.model_fingerprint(m) != one


def test_depth_database_has_influence(tmp_path, w):
    db = open_database(tiny_model("llama"), None, "depth", data=w, db=tmp_path / "db")
    assert len(db.units) == 6 and not db.missing()
    assert all(info.extra["influence"] > 0 for info in db.units.values())


def test_database_from_before_a_setting_existed_opens_as_what_it_is(tmp_path, w, monkeypatch):
    """Sparsity databases written before SparseGPT's refit have no `refit_iters` in their settings:
    they open as refit_iters=0 (how they were built), under the same default folder as before, and the
    new default (refit on) gets a folder of its own instead of mixing levels of both."""
    import json

    monkeypatch.setenv("MODELPRESS_CACHE", str(tmp_path))
    m = tiny_model("llama")
    old = open_database(m, None, "sparsity", data=w, max_levels=4, refit_iters=0)
    meta = json.loads((old.path / "db.json").read_text())
    assert "refit_iters" not in meta["kind"]["settings"]  # as written before the setting existed
    again = open_database(m, None, "sparsity", data=w, max_levels=4, refit_iters=0)
    assert again.path == old.path and again.kind.refit_iters == 0 and not again.missing()
    assert LevelDB(old.path, meta).kind.refit_iters == 0
    new = open_database(m, None, "sparsity", data=w, max_levels=4)
    assert new.kind.refit_iters == 30 and new.path != old.path
    u = next(iter(new.units))
    v = new.values(u)[0]  # the most pruned level
    assert not torch.equal(new.load(u, v).dequantize(), old.load(u, v).dequantize())


def test_default_location_follows_modelpress_db(tmp_path, w, monkeypatch):
    m = tiny_model("llama")
    monkeypatch.setenv("MODELPRESS_DB", str(tmp_path / "dbs"))
    assert LevelDB.default_path(m, QuantKind(levels=(2, 3)), w).parent == tmp_path / "dbs"
    monkeypatch.delenv("MODELPRESS_DB")
    monkeypatch.setenv("MODELPRESS_CACHE", str(tmp_path / "cache"))
    assert LevelDB.default_path(m, QuantKind(levels=(2, 3)), w).parent == tmp_path / "cache" / "db"


def test_database_records_its_compute_dtype(tmp_path, w):
    from modelpress.utils.device import compute_dtype

    m = tiny_model("llama")
    with compute_dtype("bfloat16"):
        open_database(m, None, "quant", data=w, db=tmp_path / "db", **QK)
        bf16_path = LevelDB.default_path(m, QuantKind(**QK), w)
    with compute_dtype("float32"):
        with pytest.raises(ConfigError, match="compute dtype bfloat16.*--compute-dtype bfloat16"):
            LevelDB.open_or_create(tmp_path / "db", m, QuantKind(**QK), w)
        assert LevelDB.default_path(m, QuantKind(**QK), w) != bf16_path


def test_database_records_the_dtype_its_model_was_held_in(tmp_path, w):
    """The same weights held in bfloat16 (a 16-bit folder loaded or streamed as it is) and in
    float32 with bfloat16 forwards have one fingerprint but other statistics: not one database."""
    from modelpress.utils.device import compute_dtype

    m = tiny_model("llama")
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(p.bfloat16().float())
    held = tiny_model("llama").bfloat16()
    held.load_state_dict(m.state_dict())
    with compute_dtype("bfloat16"):
        from modelpress.levels.database import model_fingerprint

        assert model_fingerprint(m) == model_fingerprint(held)
        open_database(m, None, "quant", data=w, db=tmp_path / "db", **QK)
        with pytest.raises(ConfigError, match="held in float32, this one is held in bfloat16"):
            LevelDB.open_or_create(tmp_path / "db", held, QuantKind(**QK), w)
        assert LevelDB.default_path(m, QuantKind(**QK), w) != LevelDB.default_path(held, QuantKind(**QK), w)
        assert json.loads((tmp_path / "db" / "db.json").read_text())["weights_dtype"] == "float32"
