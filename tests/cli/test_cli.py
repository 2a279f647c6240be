import json

import pytest
from typer.testing import CliRunner

from modelpress.cli.main import app
from tests.conftest import bpe_tokenizer, byte_tokenizer, tiny_model

runner = CliRunner(env={"COLUMNS": "200"})


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("m")
    tiny_model("llama").save_pretrained(d / "tiny")
    byte_tokenizer().save_pretrained(d / "tiny")
    (d / "text.txt").write_text(("The quick brown fox jumps over the lazy dog. " * 80 + "\n") * 6)
    return d


def small(model_dir):
    return ["--data", str(model_dir / "text.txt"), "--eval-suite", str(model_dir / "text.txt"), "--n-samples", "4",
            "--seq-len", "64", "--n-eval", "3"]


def test_compress_info_eval(model_dir, tmp_path):
    out = tmp_path / "ck"
    r = runner.invoke(app, ["compress", str(model_dir / "tiny"), "--method", "gptq", "--bits", "4",
                            "--group-size", "32", "--out", str(out), "--export", "hf", *small(model_dir)])
    assert r.exit_code == 0, r.output
    assert "dense" in r.output and "gptq w4 g32" in r.output
    rep = json.loads((out / "report.json").read_text())
    assert rep["rows"][0]["label"] == "dense" and rep["rows"][1]["kl"] > 0
    domain = rep["evaluation"]["domains"][0]
    assert rep["rows"][1][f"ppl:{domain}"] > 0 and rep["rows"][1]["worst_ratio"] > 1.0 > 0
    assert rep["rows"][0]["worst_ratio"] == 1.0 and rep["rows"][1]["worst_domain"] == domain
    assert f"ppl {domain}" in (out / "report.md").read_text() and "worst × dense" in (out / "report.md").read_text()
    assert (out / "report.md").read_text().startswith("# modelpress report")
    assert (tmp_path / "ck-hf" / "config.json").is_file()

    r = runner.invoke(app, ["info", str(out)])
    assert r.exit_code == 0 and "bits_per_weight" in r.output

    r = runner.invoke(app, ["eval", str(out), "--reference", str(model_dir / "tiny"),
                            "--eval-suite", str(model_dir / "text.txt"), "--seq-len", "64", "--n-eval", "2"])
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("args", [["--method", "sparsegpt", "--sparsity", "0.5"], ["--method", "wanda", "--pattern", "2:4"],
                                  ["--drop", "2"], ["--method", "rtn", "--bits", "3", "--no-eval"]])
def test_other_methods(model_dir, tmp_path, args):
    r = runner.invoke(app, ["compress", str(model_dir / "tiny"), *args, "--out", str(tmp_path / "o"), *small(model_dir)])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "o" / "modelpress.json").is_file()


def test_compute_dtype_option(model_dir, tmp_path):
    for dt in ("float32", "bfloat16"):
        r = runner.invoke(app, ["compress", str(model_dir / "tiny"), "--method", "gptq", "--bits", "4", "--no-eval",
                                "--compute-dtype", dt, "--out", str(tmp_path / dt), *small(model_dir)])
        assert r.exit_code == 0, r.output
        assert json.loads((tmp_path / dt / "modelpress.json").read_text())["plan"]["compute_dtype"] == dt


@pytest.mark.parametrize("args,msg", [
    (["compress", "no-such-model"], "unknown model"),
    (["compress", "{tiny}", "--compute-dtype", "int8"], "unknown compute dtype"),
    (["compress", "{tiny}", "--bits", "11"], "bits must be"),
    (["compress", "{tiny}", "--method", "wanda", "--bits", "4"], "has no setting bits"),
    (["compress", "{tiny}", "--method", "nope"], "unknown operator"),
    (["compress", "{tiny}", "--sparsity", "0.99"], "sparsity must be"),
    (["compress", "{tiny}", "--data", "nowhere-corpus"], "unknown corpus"),
    (["info", "{tmp}"], "not a modelpress checkpoint"),
    (["eval", "{tmp}/missing.gguf"], "GGUF file not found"),
    (["export", "gguf", "{tiny}", "--out", "{tmp}/x.gguf", "--imatrix"], "--imatrix goes with --preset"),
])
def test_bad_input_is_one_clean_line(model_dir, tmp_path, args, msg):
    args = [a.format(tiny=model_dir / "tiny", tmp=tmp_path) for a in args]
    r = runner.invoke(app, args)
    assert r.exit_code == 2, r.output
    assert msg in r.output
    assert "Traceback" not in r.output
    assert r.output.strip().startswith("error:")


def test_corrupt_checkpoint_cli(model_dir, tmp_path):
    out = tmp_path / "ck"
    assert runner.invoke(app, ["compress", str(model_dir / "tiny"), "--method", "rtn", "--no-eval",
                               "--out", str(out)]).exit_code == 0
    w = out / "weights.safetensors"
    w.write_bytes(w.read_bytes()[:-10])
    r = runner.invoke(app, ["eval", str(out), "--eval-suite", str(model_dir / "text.txt"), "--seq-len", "64"])
    assert r.exit_code == 2 and "corrupt" in r.output and "Traceback" not in r.output


def test_kv_eval_and_generate(model_dir):
    args = ["--data", str(model_dir / "text.txt"), "--seq-len", "96", "--n-eval", "2", "--prefill", "32", "--step", "8"]
    r = runner.invoke(app, ["kv", "eval", str(model_dir / "tiny"), "--method", "kivi", "--bits", "2", "--group", "8",
                            "--window", "8", "--value-bits", "3", "--value-group", "16", "--storage", "float16", *args])
    assert r.exit_code == 0, r.output
    assert "full cache" in r.output and "storage=float16" in r.output and "value_bits=3" in r.output
    assert "value_group=16" in r.output
    r = runner.invoke(app, ["kv", "eval", str(model_dir / "tiny"), "--method", "kivi", "--storage", "int3", *args])
    assert r.exit_code == 2 and "storage must be" in r.output
    r = runner.invoke(app, ["kv", "generate", str(model_dir / "tiny"), "--method", "snapkv", "--budget", "16",
                            "--window", "4", "--prompt", "The quick brown fox", "--max-new", "5"])
    assert r.exit_code == 0, r.output
    assert "cache" in r.output


def test_compressed_tensors_export_from_compress_and_from_a_checkpoint(model_dir, tmp_path):
    pytest.importorskip("compressed_tensors")
    out = tmp_path / "ck"
    r = runner.invoke(app, ["compress", str(model_dir / "tiny"), "--method", "gptq", "--bits", "4", "--group-size", "32",
                            "--export", "compressed-tensors", "--no-eval", "--out", str(out), *small(model_dir)])
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "ck-ct" / "config.json").read_text())["quantization_config"]
    assert cfg["config_groups"]["group_0"]["weights"]["group_size"] == 32  # act-order with static groups
    assert json.loads((out / "modelpress.json").read_text())["plan"]["method"]["static_groups"] is True
    r = runner.invoke(app, ["export", "compressed-tensors", str(out), "--out", str(tmp_path / "again")])
    assert r.exit_code == 0 and "Marlin" in r.output, r.output
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (tmp_path / "ck-ct" / "model.safetensors").read_bytes()
    dyn = tmp_path / "dyn"
    assert runner.invoke(app, ["compress", str(model_dir / "tiny"), "--method", "gptq", "--bits", "4", "--no-eval",
                               "--dynamic-groups", "--out", str(dyn), *small(model_dir)]).exit_code == 0
    r = runner.invoke(app, ["export", "compressed-tensors", str(dyn), "--out", str(tmp_path / "no")])
    assert r.exit_code == 2 and "--static-groups" in r.output and not (tmp_path / "no").exists()
    r = runner.invoke(app, ["compress", str(model_dir / "tiny"), "--method", "sparsegpt", "--sparsity", "0.5",
                            "--export", "compressed-tensors", "--out", str(tmp_path / "sp"), *small(model_dir)])
    assert r.exit_code == 2 and "integer-quantized layers only" in r.output and not (tmp_path / "sp").exists()
    r = runner.invoke(app, ["search", str(model_dir / "tiny"), "--target-sparsity", "0.5", "--export",
                            "compressed-tensors", "--no-eval", "--out", str(tmp_path / "ss"), *small(model_dir)])
    assert r.exit_code == 2 and "integer-quantized" in r.output and not (tmp_path / "ss").exists(), r.output


def test_compress_stream_equals_in_memory(model_dir, tmp_path):
    args = ["compress", str(model_dir / "tiny"), "--method", "gptq", "--bits", "4", "--group-size", "32",
            *small(model_dir)]
    r = runner.invoke(app, [*args, "--out", str(tmp_path / "mem")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, [*args, "--stream", "--out", str(tmp_path / "str")])
    assert r.exit_code == 0, r.output
    from safetensors.torch import load_file

    a, b = (load_file(str(tmp_path / d / "weights.safetensors")) for d in ("mem", "str"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    mem, st = (json.loads((tmp_path / d / "report.json").read_text())["rows"][-1] for d in ("mem", "str"))
    domain = json.loads((tmp_path / "str" / "report.json").read_text())["evaluation"]["domains"][0]
    assert st[f"ppl:{domain}"] == pytest.approx(mem[f"ppl:{domain}"], rel=1e-5)  # no dense row: it would not fit
    r = runner.invoke(app, [*args, "--stream", "--compensate", "eora", "--out", str(tmp_path / "x")])
    assert r.exit_code != 0 and "EoRA is not streamed" in r.output and not (tmp_path / "x").exists()
    r = runner.invoke(app, ["compress", str(model_dir / "tiny"), "--stream", "--bits", "4", "--data", "self",
                            "--no-eval", "--out", str(tmp_path / "y")])
    assert r.exit_code != 0 and "needs the whole model" in r.output


def test_streamed_budget_search_equals_in_memory(model_dir, tmp_path):
    """`compress --target-bits --stream`: the database, the fitness and the evaluation run block by
    block, the checkpoint is written block by block, and all of it equals the in-memory run."""
    from safetensors.torch import load_file

    args = ["compress", str(model_dir / "tiny"), "--target-bits", "3", *small(model_dir)]
    for name, extra in (("mem", []), ("str", ["--stream"])):
        r = runner.invoke(app, [*args, *extra, "--out", str(tmp_path / name)])
        assert r.exit_code == 0, r.output
    a, b = (load_file(str(tmp_path / d / "weights.safetensors")) for d in ("mem", "str"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    mem, st = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("mem", "str"))
    assert [h["fitness"] for h in mem["history"]] == [h["fitness"] for h in st["history"]]
    assert [r["label"] for r in st["rows"]] == [r["label"] for r in mem["rows"]]
    for rm, rs in zip(mem["rows"], st["rows"]):  # dense reference and every plan, evaluated streamed
        assert rs["worst_ratio"] == pytest.approx(rm["worst_ratio"], rel=1e-5)
    assert json.loads((tmp_path / "str" / "plan.json").read_text())["levels"] == \
        json.loads((tmp_path / "mem" / "plan.json").read_text())["levels"]
    for kind in (["--drop", "1"], ["--kind", "gguf", "--target-mb", "1"]):
        r = runner.invoke(app, ["search", str(model_dir / "tiny"), "--stream", *kind, "--no-eval",
                                "--out", str(tmp_path / "d"), *small(model_dir)])
        assert r.exit_code != 0 and "in memory" in r.output and not (tmp_path / "d").exists(), r.output


def test_a_bf16_model_streamed_with_float32_forwards_equals_in_memory(model_dir, tmp_path):
    """A bfloat16 folder streams in bfloat16 by default; `--compute-dtype float32` holds it in
    float32, as the in-memory load does, and gives the in-memory checkpoint."""
    import torch

    src = tmp_path / "bf16"
    tiny_model("llama").to(torch.bfloat16).save_pretrained(src)
    byte_tokenizer().save_pretrained(src)
    args = ["compress", str(src), "--method", "gptq", "--bits", "4", "--group-size", "32", "--no-eval",
            "--compute-dtype", "float32", *small(model_dir)]
    for name, extra in (("mem", []), ("str", ["--stream"])):
        r = runner.invoke(app, [*args, *extra, "--out", str(tmp_path / name)])
        assert r.exit_code == 0, r.output
    from safetensors.torch import load_file

    a, b = (load_file(str(tmp_path / d / "weights.safetensors")) for d in ("mem", "str"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_gguf_export_of_a_llama_cpp_preset_with_and_without_imatrix(model_dir, tmp_path):
    from modelpress.export import llamacpp

    if not llamacpp.available():
        pytest.skip("needs llama.cpp's library")
    tok = bpe_tokenizer()  # a vocabulary llama.cpp loads: it runs the model for the importance matrix
    tiny_model("llama", vocab=len(tok)).save_pretrained(tmp_path / "bpe")
    tok.save_pretrained(tmp_path / "bpe")
    args = ["export", "gguf", str(tmp_path / "bpe"), "--preset", "Q4_0", "--data", str(model_dir / "text.txt"),
            "--n-samples", "4", "--seq-len", "64"]
    for name, extra in (("plain", []), ("im", ["--imatrix"])):
        r = runner.invoke(app, [*args, *extra, "--out", str(tmp_path / f"{name}.gguf")])
        assert r.exit_code == 0, r.output
    plain, im = (llamacpp.tensor_types(tmp_path / f"{n}.gguf") for n in ("plain", "im"))
    assert plain == im and plain["blk.0.attn_q.weight"] == "Q4_0"  # 3 blocks: no imatrix-only type changes
    assert (tmp_path / "plain.gguf").read_bytes() != (tmp_path / "im.gguf").read_bytes()
    from modelpress.export.ggufio import verify_gguf

    verify_gguf(tmp_path / "im.gguf")  # llama.cpp's file copied the export's checksum key: resealed, it holds
    r = runner.invoke(app, [*args, "--preset", "Q9_K", "--out", str(tmp_path / "bad.gguf")])
    assert r.exit_code == 2 and "unknown llama.cpp preset" in r.output and not (tmp_path / "bad.gguf").exists()

