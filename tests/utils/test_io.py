"""Atomic writes and their recovery after a crash; JSON checksums."""
import json
import os
import subprocess

import pytest

from modelpress.utils import io


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


@pytest.fixture(autouse=True)
def fresh_recovery(monkeypatch):
    monkeypatch.setattr(io, "_recovered", set())


@pytest.mark.parametrize("name", ["ck", "out-3bit.v2", "a.tmp-b"])
def test_a_save_killed_between_its_renames_is_undone(tmp_path, name):
    """Killed after the old version was moved aside and before the new one took its place: the
    old version comes back; the new one's temporary folder (its writer is gone) is removed."""
    tag = f"{dead_pid()}x{io._host()}"
    (tmp_path / f".{name}.old-{tag}-1234abcd").mkdir()
    (tmp_path / f".{name}.old-{tag}-1234abcd" / "f").write_text("old")
    (tmp_path / f".{name}.tmp-{tag}-xyz").mkdir()
    io.recover_interrupted(tmp_path / name)
    assert (tmp_path / name / "f").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_leftovers_of_live_or_foreign_writers_are_kept(tmp_path):
    live = tmp_path / f".ck.tmp-{os.getppid()}x{io._host()}-abc"
    foreign = tmp_path / f".ck.tmp-{dead_pid()}x{'0' * 8 if io._host() != '0' * 8 else '1' * 8}-abc"
    untagged = tmp_path / ".ck.tmp-abcdef"  # not a name modelpress makes
    for p in (live, foreign, untagged):
        p.mkdir()
    io.recover_interrupted(tmp_path / "ck")
    assert live.exists() and foreign.exists() and untagged.exists()


def test_atomic_dir_replaces_and_cleans(tmp_path):
    with io.atomic_dir(tmp_path / "out") as d:
        (d / "a").write_text("1")
    with io.atomic_dir(tmp_path / "out") as d:
        (d / "a").write_text("2")
    assert (tmp_path / "out" / "a").read_text() == "2" and [p.name for p in tmp_path.iterdir()] == ["out"]
    with pytest.raises(RuntimeError), io.atomic_dir(tmp_path / "out") as d:
        (d / "a").write_text("3")
        raise RuntimeError("boom")
    assert (tmp_path / "out" / "a").read_text() == "2" and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_checksum_survives_what_json_changes(tmp_path):
    """Integer keys come back as strings, tuples as lists: the checksum is of what is read back."""
    obj = {"id2label": {i: f"L{i}" for i in range(12)}, "shape": (3, 4), "x": 0.1 + 0.2, "big": 2 ** 70}
    io.write_json(tmp_path / "a.json", obj, checksum=True)
    back = io.read_json(tmp_path / "a.json", "test file", "")
    assert back["id2label"]["11"] == "L11" and back["shape"] == [3, 4]
    raw = json.loads((tmp_path / "a.json").read_text())
    raw["x"] = 0.3
    (tmp_path / "a.json").write_text(json.dumps(raw))
    with pytest.raises(io.CorruptFileError, match="test file is corrupt"):
        io.read_json(tmp_path / "a.json", "test file", "")
