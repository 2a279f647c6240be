"""The kind interface: a kind is one class; the database, the budget and the search need nothing else."""
import dataclasses
import json
import re
from pathlib import Path

import pytest

import modelpress
from modelpress.allocate.budget import Budget
from modelpress.errors import CheckpointError
from modelpress.levels import KINDS, Kind
from modelpress.levels.build import on_dense_inputs
from modelpress.models.arch import get_weight
from modelpress.ops.base import output_error
from modelpress.search import allocate, open_database
from modelpress.utils.io import json_checksum
from tests.conftest import tiny_model
from tests.export.test_checkpoint import windows


@dataclasses.dataclass
class RoundToNearest(Kind):
    """A kind written only here: RTN at two bit-widths, costed in bytes."""

    bits: tuple[int, ...] = (2, 4)
    budgets = ("mb",)
    tensors_per_unit = 4

    def values(self, unit):
        return [f"rtn{b}" for b in self.bits]

    def build(self, db, model, windows, batch_size, device) -> None:
        from modelpress.ops import OPERATORS

        def per_layer(n, mod, st, want):
            w = get_weight(mod).float()
            new = {}
            for v in want:
                pw = OPERATORS.build("rtn", bits=int(v[3:]), group_size=16).compress(w, None)
                new[v] = (pw, output_error(w, pw.dequantize(), st.hessian))
            db.add_levels(n, new)

        on_dense_inputs(db, model, windows, batch_size, device, "database rtn", per_layer)


@pytest.fixture
def rtn_kind():
    KINDS.register("test-rtn")(RoundToNearest)
    yield "test-rtn"
    KINDS._items.pop("test-rtn")


def test_a_new_kind_is_one_class(tmp_path, rtn_kind):
    m = tiny_model("llama")
    db = open_database(m, None, rtn_kind, data=windows(), db=tmp_path / "db")
    assert not db.missing() and all(db.values(u) == ["rtn2", "rtn4"] for u in db.units)
    lo = db.meta["fixed_bytes"] + sum(db.level_meta(u, "rtn2")["nbytes"] for u in db.units)
    res = allocate(m, db, Budget("mb", (lo + 3000) / 1e6 + 0.01), "dp")
    assert set(res.plan.levels.values()) <= {"rtn2", "rtn4"} and res.plan.info["cost"] <= res.plan.info["budget_cost"]


def test_no_module_outside_the_kinds_names_a_kind():
    """Kind names and classes appear only in levels/kinds/ (and the registry's users by name)."""
    root = Path(modelpress.__file__).parent
    pattern = re.compile(r"\b(QuantKind|SparsityKind|DepthKind|JointKind|LowRankKind|GGUFKind)\b"
                         r"|registered_name\s*==|_build_(quant|sparsity|depth|joint|lowrank|gguf)")
    offenders = [str(p.relative_to(root)) for p in root.rglob("*.py")
                 if "kinds" not in p.relative_to(root).parts and p.name != "__init__.py"
                 and pattern.search(p.read_text())]
    assert offenders == []


def test_database_version_is_checked_and_older_ones_migrate(tmp_path, float32_forwards):
    m = tiny_model("llama")
    w = windows()
    db = open_database(m, None, "quant", data=w, db=tmp_path / "db", levels=(2, 3), group_size=16)
    mf = db.path / "db.json"
    meta = json.loads(mf.read_text())
    assert meta["version"] == 2 and meta["compute_dtype"] == "float32"
    old = {k: v for k, v in meta.items() if k not in ("compute_dtype", "fixed_header_bytes", "fixed_tensors", "sha256")}
    mf.write_text(json.dumps({**old, "version": 1}))  # as version 1 wrote it
    again = open_database(m, None, "quant", data=w, db=db.path, levels=(2, 3), group_size=16)
    assert not again.missing()
    migrated = json.loads(mf.read_text())
    assert migrated["sha256"] == json_checksum(migrated)  # rewritten with its checksum
    assert migrated["version"] == 2 and migrated["compute_dtype"] == "float32"
    assert migrated["fixed_header_bytes"] == meta["fixed_header_bytes"]
    mf.write_text(json.dumps({**meta, "version": 99, "sha256": json_checksum({**meta, "version": 99})}))
    with pytest.raises(CheckpointError, match="newer modelpress"):
        open_database(m, None, "quant", data=w, db=db.path, levels=(2, 3), group_size=16)


def test_serve_vllm_ties_fused_layers_and_keeps_the_budget(tmp_path):
    from modelpress.allocate.budget import make_problem
    from modelpress.errors import ConfigError
    from modelpress.levels import QuantKind
    from modelpress.search import materialize

    m = tiny_model("llama")
    db = open_database(m, None, "quant", data=windows(), db=tmp_path / "db", levels=(4, 8), group_size=32, sym=True,
                       serve="vllm")
    assert db.kind.static_groups  # act-order groups the format can store
    p = make_problem(db, Budget("bits", 6))
    assert len(p.units) == 3 * 4 and sum(len(p.members(i)) for i in range(len(p.units))) == 21  # qkv, o, gate+up, down
    assert p.groups[0] == "q_proj+k_proj+v_proj"
    for alloc in ("dp", "uniform", "evolutionary"):
        kw = dict(generations=3, offspring=4, tokens=(64,), survivors=(1,)) if alloc == "evolutionary" else {}
        res = allocate(m, db, Budget("bits", 6), alloc, data=windows(), **kw)
        lv = res.plan.levels
        for b in range(3):
            att, mlp = f"model.layers.{b}.self_attn.", f"model.layers.{b}.mlp."
            assert lv[att + "q_proj"] == lv[att + "k_proj"] == lv[att + "v_proj"]
            assert lv[mlp + "gate_proj"] == lv[mlp + "up_proj"]
        numel = sum(u.numel for u in db.units.values())
        assert sum(int(v) * db.units[u].numel for u, v in lv.items()) <= 6 * numel
        assert res.plan.choice(res.problem) == [p.extra["values"][i].index(lv[p.members(i)[0]])
                                                for i in range(len(p.units))]
    c = materialize(m, None, db, res.plan)
    pytest.importorskip("compressed_tensors")
    info = c.export("compressed-tensors", tmp_path / "ct")
    assert info["path"] == str(tmp_path / "ct") and info["schemes"]
    cfg = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]["config_groups"]
    where = {t: g for g, grp in cfg.items() for t in grp["targets"]}
    for b in range(3):
        att = f"model.layers.{b}.self_attn."
        assert where[att + "q_proj"] == where[att + "k_proj"] == where[att + "v_proj"]
    with pytest.raises(ConfigError, match="no fast kernel"):
        QuantKind(levels=(2, 3, 4), serve="vllm")
    with pytest.raises(ConfigError, match="--sym"):
        QuantKind(levels=(4, 8), serve="vllm")
    with pytest.raises(ConfigError, match="engines are"):
        QuantKind(levels=(4,), serve="sglang-x")
