"""Damaged files are detected with a one-line error (database units: rebuilt), never loaded as a
different model, plan or search state. The trials are seeded; bench/reliability.py runs more."""
import shutil

import pytest

import modelpress as mp
from modelpress.errors import CheckpointError
from modelpress.levels import QuantKind
from modelpress.search import open_database
from tests.conftest import tiny_model
from tests.export.test_checkpoint import windows
from tests.faults import corruption as fz

QK = dict(levels=(2, 3, 4), group_size=16)


def _clean(res: dict) -> None:
    assert not res["failures"], res["failures"][:5]
    assert res["detected"] > 0


def test_checkpoint_damage_is_detected(tmp_path):
    mp.compress(tiny_model("llama"), None, "rtn", bits=4, group_size=16).save(tmp_path / "ck")
    res = fz.checkpoint_trials(tmp_path / "ck", tmp_path / "work", n=24)
    _clean(res)


def test_checkpoint_manifest_checksum_covers_its_config(tmp_path):
    """A flipped digit inside the manifest's config still parses; the manifest's checksum catches it."""
    mp.compress(tiny_model("llama"), None, "rtn", bits=4, group_size=16).save(tmp_path / "ck")
    mf = tmp_path / "ck" / "modelpress.json"
    text = mf.read_text()
    assert '"rms_norm_eps": 1e-06' in text
    mf.write_text(text.replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": 1e-05'))
    with pytest.raises(CheckpointError, match="checkpoint manifest is corrupt"):
        mp.load_compressed(tmp_path / "ck")


@pytest.mark.parametrize("name", ["plan", "search checkpoint", "sensitivity cache"])
def test_json_damage_is_detected(tmp_path, name):
    path, read = fz.json_artifacts(tmp_path / "files")[name]
    _clean(fz.json_trials(path, tmp_path / "work", n=40, read=read))


def test_damaged_search_checkpoint_is_kept_aside(tmp_path):
    path, read = fz.json_artifacts(tmp_path)["search checkpoint"]
    path.write_text(path.read_text().replace('"generation": 7', '"generation": 8'))
    assert read(path) is None
    assert not path.exists() and (tmp_path / "search.damaged.json").is_file()


def test_level_database_damage(tmp_path):
    w = windows()
    open_database(tiny_model("llama"), None, "quant", data=w, db=tmp_path / "db", **QK)

    def reopen(folder):
        return open_database(tiny_model("llama"), None, "quant", data=w, db=folder, **QK)

    _clean(fz.database_unit_trials(tmp_path / "db", tmp_path / "work", n=6, reopen=reopen))
    shutil.copytree(tmp_path / "db", tmp_path / "db2")
    read = fz.db_json_reader(lambda: tiny_model("llama"), QuantKind(**QK), w)
    _clean(fz.json_trials(tmp_path / "db2" / "db.json", tmp_path / "work2", n=30, read=read))


def test_gguf_damage_is_detected(tmp_path, monkeypatch):
    from modelpress.export.ggufio import export_gguf
    from tests.conftest import byte_tokenizer

    monkeypatch.setenv("MODELPRESS_CACHE", str(tmp_path / "cache"))
    export_gguf(tiny_model("llama"), tmp_path / "m.gguf", default_type="Q8_0", tokenizer=byte_tokenizer())
    _clean(fz.gguf_trials(tmp_path / "m.gguf", tmp_path / "work", n=12))
