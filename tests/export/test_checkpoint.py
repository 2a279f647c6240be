import json
import os

import pytest
import torch

import modelpress as mp
from modelpress.data import DataConfig, Windows
from modelpress.errors import CheckpointError
from modelpress.export import checkpoint as ck
from tests.conftest import ARCHS, tiny_model


def windows():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (12, 32), generator=g)
    return Windows(ids[:8], ids[8:], [], [], DataConfig(n_samples=8, seq_len=32))


CASES = [("gptq", dict(bits=4, group_size=32)), ("gptq", dict(bits=3, group_size=48, sym=True)),
         ("rtn", dict(bits=2, group_size=None)), ("sparsegpt", dict(sparsity=0.6)),
         ("wanda", dict(pattern="2:4")), ("magnitude", dict(sparsity=0.5)),
         ("sparsegpt", dict(sparsity=0.5, bits=4))]


@pytest.mark.parametrize("method,kw", CASES)
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_roundtrip_identical_logits(tmp_path, arch, method, kw):
    m = tiny_model(arch)
    w = windows()
    c = mp.compress(m, None, method, data=w, drop=1, **kw)
    c.save(tmp_path / "ck")
    m2 = mp.load_compressed(tmp_path / "ck")
    with torch.no_grad():
        assert torch.equal(m(w.eval).logits, m2(w.eval).logits)
    info = mp.info(tmp_path / "ck")
    assert info["bits_per_weight"] == pytest.approx(8 * c.nbytes() / sum(p.numel for p in c.units.values()))
    # the file really is that small: packed units + float16 rest + header
    dense_bytes = sum(t.numel() * 2 for t in ck.dense_tensors(m, c.units)[0].values())
    size = os.path.getsize(tmp_path / "ck" / ck.WEIGHTS)
    assert c.nbytes() + dense_bytes <= size < c.nbytes() + dense_bytes + 64_000


@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_roundtrips(tmp_path, arch):
    m = tiny_model(arch)
    w = windows()
    mp.compress(m, None, "gptq", data=w, bits=4, group_size=16).save(tmp_path / "ck")
    with torch.no_grad():
        assert torch.equal(m(w.eval).logits, mp.load_compressed(tmp_path / "ck")(w.eval).logits)


@pytest.fixture
def saved(tmp_path):
    m = tiny_model("llama")
    mp.compress(m, None, "rtn", bits=4).save(tmp_path / "ck")
    return tmp_path / "ck"


def test_corrupt_weights_detected(saved):
    p = saved / ck.WEIGHTS
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt.*weights.safetensors"):
        mp.load_compressed(saved)


def test_truncated_weights_detected(saved):
    p = saved / ck.WEIGHTS
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="corrupt"):
        mp.load_compressed(saved)


def test_missing_file_detected(saved):
    (saved / ck.WEIGHTS).unlink()
    with pytest.raises(CheckpointError, match="missing"):
        mp.load_compressed(saved)


def test_bad_manifest(saved):
    (saved / ck.MANIFEST).write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        mp.load_compressed(saved)
    (saved / ck.MANIFEST).write_text(json.dumps({"format": ck.FORMAT, "version": 99}))
    with pytest.raises(CheckpointError, match="newer modelpress"):
        mp.load_compressed(saved)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not a modelpress checkpoint"):
        mp.load_compressed(tmp_path)


def test_failed_save_keeps_previous_checkpoint(saved, monkeypatch):
    before = {p.name: p.read_bytes() for p in saved.iterdir()}
    m = tiny_model("llama", seed=5)
    c = mp.compress(m, None, "rtn", bits=3)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ck, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        c.save(saved)
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before
    assert [p.name for p in saved.parent.iterdir() if p.name.startswith(".")] == []
