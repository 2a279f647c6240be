"""The kind interface: a kind is one class; the database, the budget and the search need nothing else."""
import dataclasses
import json
import re
from pathlib import Path

import pytest

import modelpress
from modelpress.errors import CheckpointError
from modelpress.levels import KINDS, Kind
from modelpress.levels.build import on_dense_inputs
from modelpress.models.arch import get_weight
from modelpress.ops.base import output_error
from modelpress.search import allocate, open_database
from modelpress.allocate.budget import Budget
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


def test_database_version_is_checked_and_older_ones_migrate(tmp_path):
    m = tiny_model("llama")
    w = windows()
    db = open_database(m, None, "quant", data=w, db=tmp_path / "db", levels=(2, 3), group_size=16)
    mf = db.path / "db.json"
    meta = json.loads(mf.read_text())
    assert meta["version"] == 2 and meta["compute_dtype"] == "float32"
    old = {k: v for k, v in meta.items() if k not in ("compute_dtype", "fixed_header_bytes", "fixed_tensors")}
    mf.write_text(json.dumps({**old, "version": 1}))  # as version 1 wrote it
    again = open_database(m, None, "quant", data=w, db=db.path, levels=(2, 3), group_size=16)
    assert not again.missing()
    migrated = json.loads(mf.read_text())
    assert migrated["version"] == 2 and migrated["compute_dtype"] == "float32"
    assert migrated["fixed_header_bytes"] == meta["fixed_header_bytes"]
    mf.write_text(json.dumps({**meta, "version": 99}))
    with pytest.raises(CheckpointError, match="newer modelpress"):
        open_database(m, None, "quant", data=w, db=db.path, levels=(2, 3), group_size=16)
