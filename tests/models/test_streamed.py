import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import modelpress as mp
from modelpress.errors import CheckpointError, ConfigError, ModelLoadError
from modelpress.export import checkpoint as ck
from modelpress.models import load_model
from modelpress.models.streamed import open_streamed, streamed
from modelpress.models.synthetic import llama_config, write_random_model
from tests.conftest import tiny_model
from tests.export.test_checkpoint import windows


def _tensors(path):
    out = {}
    for f in ck.weight_files(ck.read_manifest(path)):
        out.update(load_file(str(path / f)))
    return out


def _saved(tmp_path, arch):
    src = tmp_path / f"{arch}-src"
    tiny_model(arch).save_pretrained(src, max_shard_size="100KB")  # several shards, as big models come
    return src


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen3"])
@pytest.mark.parametrize("method,kw", [("gptq", dict(bits=4, group_size=32)), ("rtn", dict(bits=3)),
                                       ("sparsegpt", dict(sparsity=0.5))])
def test_streamed_checkpoint_equals_in_memory(tmp_path, arch, method, kw):
    src = _saved(tmp_path, arch)
    w = windows()
    m, _ = load_model(src)
    mp.compress(m, None, method, data=w, **kw).save(tmp_path / "mem")
    sm = open_streamed(src)
    assert all(p.device.type == "meta" for p in sm.arch.blocks.parameters())  # nothing of a block loaded
    c = mp.compress(sm.model, None, method, data=w, out=tmp_path / "str", **kw)
    assert c.checkpoint == str(tmp_path / "str") and not c.units
    a, b = _tensors(tmp_path / "mem"), _tensors(tmp_path / "str")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = ck.read_manifest(tmp_path / "mem"), ck.read_manifest(tmp_path / "str")
    assert ma["units"] == mb["units"] and ma["tied"] == mb["tied"] and ma["plan"] == mb["plan"]
    reloaded = mp.load_compressed(tmp_path / "str")
    with torch.no_grad():
        assert torch.equal(reloaded(w.eval).logits, m(w.eval).logits)
    assert not sm.resident and all(p.device.type == "meta" for p in sm.arch.blocks.parameters())


def test_streamed_drop_and_sequential_off(tmp_path):
    src = _saved(tmp_path, "llama")
    w = windows()
    m, _ = load_model(src)
    mp.compress(m, None, "gptq", data=w, bits=3, sequential=False, drop=1).save(tmp_path / "mem")
    c = mp.compress(open_streamed(src).model, None, "gptq", data=w, bits=3, sequential=False, drop=1,
                    out=tmp_path / "str")
    assert c.dropped and c.dropped == ck.read_manifest(tmp_path / "mem")["dropped"]
    a, b = _tensors(tmp_path / "mem"), _tensors(tmp_path / "str")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_streamed_misuse_is_refused(tmp_path):
    src = _saved(tmp_path, "llama")
    sm = open_streamed(src)
    with pytest.raises(ConfigError, match="block by block: give out="):
        mp.compress(sm.model, None, "rtn", bits=4)
    c = mp.compress(sm.model, None, "rtn", bits=4, out=tmp_path / "ck")
    with pytest.raises(ConfigError, match="written to .*ck as it ran"):
        c.save(tmp_path / "other")
    with pytest.raises(ConfigError, match="modelpress export"):
        c.export("hf", tmp_path / "hf")
    assert streamed(tiny_model("llama")) is None
    with pytest.raises(ModelLoadError, match="local model folder"):
        open_streamed(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text((src / "config.json").read_text())
    with pytest.raises(ModelLoadError, match="no safetensors weights"):
        open_streamed(tmp_path / "empty")


def test_truncated_shard_is_reported(tmp_path):
    src = _saved(tmp_path, "llama")
    sm = open_streamed(src)
    shard, start, meta = sm.source.entries["model.layers.2.mlp.down_proj.weight"]
    shard.write_bytes(shard.read_bytes()[:start + meta["data_offsets"][0] + 10])
    with pytest.raises(ModelLoadError, match="truncated"):
        mp.compress(sm.model, None, "rtn", bits=4, out=tmp_path / "ck")
    assert not (tmp_path / "ck").exists()  # nothing half-made


def test_sharded_checkpoint_roundtrip(tmp_path):
    m = tiny_model("llama")
    w = windows()
    c = mp.compress(m, None, "gptq", data=w, bits=4, group_size=32)
    mf = ck.save_checkpoint(tmp_path / "ck", m, c.units, plan=c.plan, shard_bytes=20_000)
    assert len(mf["weight_files"]) > 3 and all(f in mf["files"] for f in mf["weight_files"])
    with torch.no_grad():
        assert torch.equal(mp.load_compressed(tmp_path / "ck")(w.eval).logits, m(w.eval).logits)
    info = mp.info(tmp_path / "ck")
    assert info["weights_mb"] * 1e6 == sum((tmp_path / "ck" / f).stat().st_size for f in mf["weight_files"])
    shard = tmp_path / "ck" / mf["weight_files"][2]
    shard.write_bytes(shard.read_bytes()[:-8])
    with pytest.raises(CheckpointError, match="corrupt"):
        mp.load_compressed(tmp_path / "ck")


def test_streamed_gptq_memory_stays_below_half_the_model(tmp_path):
    """A ~1.5 GB random Llama in safetensors shards, GPTQ-compressed streamed in a fresh process:
    its peak resident memory over the process's fixed overhead (libraries; measured after the same
    run on a tiny model) stays below half the model's size. Loaded whole, the model alone would be
    1.5 GB over that overhead."""
    src = tmp_path / "big"
    size = write_random_model(src, llama_config(1.5e9))
    assert 1.4e9 < size < 1.6e9
    res = subprocess.run([sys.executable, "-m", "modelpress.models.synthetic", str(src), str(tmp_path / "ck"),
                          "gptq", "bits=4", "group_size=128", "mse=false"],
                         capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stderr[-2000:]
    r = json.loads(res.stdout.strip().splitlines()[-1])
    assert r["model_bytes"] == size
    assert r["peak_over_fixed"] < 0.5 * size, r
    info = mp.info(tmp_path / "ck")
    assert info["units"] == 7 * llama_config(1.5e9).num_hidden_layers and info["bits_per_weight"] < 4.2


def test_a_16_bit_model_streams_in_16_bits(tmp_path):
    """A bfloat16 folder is held in bfloat16 (half the memory of float32); its GPTQ checkpoint is
    about as close to the dense model as the one made from the same weights held in float32."""
    from modelpress.models.synthetic import write_random_model

    cfg = llama_config(4e6, hidden=128, intermediate=256, heads=4, kv_heads=2, vocab=256)
    write_random_model(tmp_path / "bf16", cfg, dtype=torch.bfloat16)
    sm = open_streamed(tmp_path / "bf16")
    assert sm.dtype == torch.bfloat16 and sm.model.model.embed_tokens.weight.dtype == torch.bfloat16
    w = windows()
    mp.compress(sm.model, None, "gptq", data=w, bits=4, group_size=32, out=tmp_path / "a")
    mp.compress(open_streamed(tmp_path / "bf16", dtype=torch.float32).model, None, "gptq", data=w, bits=4,
                group_size=32, out=tmp_path / "b")
    a, b = mp.load_compressed(tmp_path / "a"), mp.load_compressed(tmp_path / "b")
    dense, _ = load_model(tmp_path / "bf16")
    with torch.no_grad():
        ld = dense(w.eval).logits
        err_a, err_b = ((m(w.eval).logits - ld).abs().mean() for m in (a, b))
    assert 0 < err_a < 1.25 * err_b, (err_a, err_b)
    with pytest.raises(ModelLoadError, match="dtype"):
        open_streamed(tmp_path / "bf16", dtype="half")


def test_streamed_forwards_hold_one_block_and_equal_the_loaded_model(tmp_path):
    from modelpress.models.streamed import block_forwards

    src = _saved(tmp_path, "llama")
    m, _ = load_model(src)
    sm = open_streamed(src)
    w = windows()
    seen = []
    with torch.no_grad(), block_forwards(sm.model):
        probe = sm.model.model.layers[1].register_forward_pre_hook(lambda mod, args: seen.append(sorted(sm.resident)))
        out = sm.model(w.eval[:2]).logits
        probe.remove()
    assert torch.equal(out, m(w.eval[:2]).logits)
    assert seen == [[1]] and not sm.resident  # block 1 ran alone in memory; nothing is left in
    boom = sm.model.model.layers[2].register_forward_pre_hook(lambda mod, args: 1 / 0)
    with pytest.raises(ZeroDivisionError), torch.no_grad(), block_forwards(sm.model):
        sm.model(w.eval[:1])
    boom.remove()
    assert not sm.resident and all(p.device.type == "meta" for p in sm.arch.blocks.parameters())


@pytest.mark.parametrize("kind,kw,budget", [("quant", dict(levels=(2, 3, 4), group_size=32), ("bits", 3.0)),
                                            ("sparsity", dict(max_levels=6), ("sparsity", 0.5))])
def test_streamed_database_search_and_plan_equal_in_memory(tmp_path, kind, kw, budget):
    """A level database, an evolutionary search and the plan's checkpoint made from a streamed model
    (blocks on disk; forwards bring one in at a time) equal those made from the model in memory."""
    from modelpress.allocate.budget import Budget
    from modelpress.search import allocate, materialize, open_database

    src = _saved(tmp_path, "llama")
    w = windows()
    m, _ = load_model(src)
    sm = open_streamed(src)
    dbs = [open_database(model, None, kind, db=tmp_path / name, data=w, **kw)
           for model, name in ((m, "dbm"), (sm.model, "dbs"))]
    # units, fingerprint, and the fixed tensors' bytes a MB budget counts
    assert {k: v for k, v in dbs[0].meta.items() if k != "build_seconds"} == \
        {k: v for k, v in dbs[1].meta.items() if k != "build_seconds"}
    for u in dbs[0].units:
        for v in dbs[0].values(u):
            a, b = dbs[0].load(u, v), dbs[1].load(u, v)
            assert torch.equal(a.dequantize(), b.dequantize())
    res = [allocate(model, db, Budget(*budget), "evolutionary", data=w, generations=6, offspring=6, seed=1)
           for model, db in ((m, dbs[0]), (sm.model, dbs[1]))]
    assert [h["fitness"] for h in res[0].history] == [h["fitness"] for h in res[1].history]
    assert any(h["improved"] for h in res[0].history)  # the search moved, so equal plans mean something
    assert res[0].plan.levels == res[1].plan.levels
    assert not sm.resident
    with pytest.raises(ConfigError, match="give out="):
        materialize(sm.model, None, dbs[1], res[1].plan)
    materialize(m, None, dbs[0], res[0].plan).save(tmp_path / "mem")
    c = materialize(sm.model, None, dbs[1], res[1].plan, out=tmp_path / "str")
    assert c.checkpoint == str(tmp_path / "str") and not c.units
    a, b = _tensors(tmp_path / "mem"), _tensors(tmp_path / "str")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = ck.read_manifest(tmp_path / "mem"), ck.read_manifest(tmp_path / "str")
    assert ma["units"] == mb["units"] and ma["plan"] == mb["plan"] and ma["total_params"] == mb["total_params"]
    with torch.no_grad():
        assert torch.equal(mp.load_compressed(tmp_path / "str")(w.eval).logits, m(w.eval).logits)
