"""The search pipeline end to end on a tiny model, through the CLI."""
import json

import pytest

from typer.testing import CliRunner

from modelpress.cli.main import app
from tests.cli.test_cli import model_dir, small  # noqa: F401  (fixture)

runner = CliRunner(env={"COLUMNS": "200"})


def test_search_cli_writes_plan_checkpoint_report_plots(model_dir, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    r = runner.invoke(app, ["search", str(model_dir / "tiny"), "--kind", "quant", "--levels", "2,3,4",
                            "--group-size", "32", "--target-bits", "3", "--compare", "uniform,dp,sensitivity",
                            "--init", "sensitivity", "--generations", "4", "--offspring", "4", "--tokens", "64,128", "--survivors", "2,1",
                            "--fitness-windows", "4", "--db", str(tmp_path / "db"), "--out", str(out),
                            *small(model_dir)])
    assert r.exit_code == 0, r.output
    for f in ("plan.json", "modelpress.json", "weights.safetensors", "report.json", "report.md"):
        assert (out / f).is_file(), f
    for png in ("levels.png", "fitness.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rep = json.loads((out / "report.json").read_text())
    assert [row["label"] for row in rep["rows"]] == ["dense", "uniform", "dp", "sensitivity", "evolutionary"]
    assert (tmp_path / "db" / "searches" / "bits-3-evolutionary.sensitivity.json").is_file()  # the start's measurements
    assert len(rep["history"]) == 4
    plan = json.loads((out / "plan.json").read_text())
    assert plan["kind"] == "quant" and plan["info"]["cost"] <= plan["info"]["budget_cost"]

    # applying the saved plan reproduces the checkpoint without searching
    out2 = tmp_path / "out2"
    r = runner.invoke(app, ["search", str(model_dir / "tiny"), "--kind", "quant", "--levels", "2,3,4",
                            "--group-size", "32", "--target-bits", "3", "--plan", str(out / "plan.json"),
                            "--db", str(tmp_path / "db"), "--out", str(out2), "--no-eval", *small(model_dir)])
    assert r.exit_code == 0, r.output
    assert (out2 / "weights.safetensors").read_bytes() == (out / "weights.safetensors").read_bytes()

    # an allocator with no start plan reports the returned plan's validation KL alone
    r = runner.invoke(app, ["search", str(model_dir / "tiny"), "--kind", "quant", "--levels", "2,3,4",
                            "--group-size", "32", "--target-bits", "3", "-a", "sensitivity", "--fitness-windows", "4",
                            "--db", str(tmp_path / "db"), "--out", str(tmp_path / "out3"), *small(model_dir)])
    assert r.exit_code == 0, r.output
    assert "returned plan" in r.output and "start" not in r.output.split("validation KL")[1].split("\n")[0]


def test_budget_compress_and_bad_budgets(model_dir, tmp_path):  # noqa: F811
    r = runner.invoke(app, ["compress", str(model_dir / "tiny"), "--target-bits", "3.5", "--out", str(tmp_path / "o"),
                            "--sym", "--no-act-order", "--export", "hf",
                            "--data", str(model_dir / "text.txt"), "--eval-suite", str(model_dir / "text.txt"),
                            "--n-samples", "4", "--seq-len", "64", "--n-eval", "2"])
    assert r.exit_code == 0, r.output
    assert "uniform" in r.output and "evolutionary" in r.output
    rep = json.loads((tmp_path / "o" / "report.json").read_text())
    assert rep["method"]["sequential_level"] == 3  # levels calibrated on the level nearest 3.5 bits (ties: lower)
    assert rep["method"]["sym"] is True and rep["method"]["act_order"] is False  # the quantizer's settings apply
    assert (tmp_path / "o-hf" / "config.json").is_file() and rep["export"]["path"] == str(tmp_path / "o-hf")
    for args, msg in [(["--target-bits", "9"], "outside the database levels"),
                      (["--target-bits", "3", "--target-mb", "1"], "exactly one budget"),
                      (["--drop", "2", "--kind", "quant"], "does not apply"),
                      (["--target-bits", "3", "--allocator", "owl"], "does not apply to kind"),
                      (["--target-bits", "3", "--sequential-level", "w5"], "not one of the levels"),
                      (["--target-bits", "3", "--sequential-level", "three"], "give one of the bit-widths"),
                      (["--target-sparsity", "0.5", "--sequential-level", "w3"], "does not apply to --kind sparsity"),
                      (["--target-bits", "3", "--allocator", "dp", "--init", "sensitivity"], "apply to the evolutionary"),
                      (["--target-bits", "3", "--init", "nope"], "init must be one of")]:
        r = runner.invoke(app, ["search", str(model_dir / "tiny"), *args, "--levels", "2,3,4", "--no-eval",
                                "--db", str(tmp_path / "db2"), *small(model_dir)])
        assert r.exit_code == 2 and msg in r.output and "Traceback" not in r.output, (args, r.output)


@pytest.mark.parametrize("args,msg", [
    (["--target-bits", "3", "--method", "gptq"], "--method does not apply with a budget"),
    (["--target-bits", "3", "--bits", "4"], "--bits does not apply"),
    (["--target-bits", "3", "--compensate", "eora"], "--kind joint --ranks"),
    (["--target-bits", "3", "--rank", "8"], "--rank does not apply"),
    (["--target-bits", "3", "--no-sequential"], "--no-sequential does not apply"),
    (["--target-bits", "3", "--drop", "1"], "--drop does not apply"),
    (["--target-bits", "3", "--refit-iters", "5"], "applies to --target-sparsity"),
    (["--target-sparsity", "0.5", "--sym"], "--sym does not apply"),
    (["--target-sparsity", "0.5", "--shrink", "0.2"], "--shrink does not apply"),
    (["--target-sparsity", "0.5", "--group-size", "32"], "--group-size does not apply"),
    (["--target-bits", "3", "--export", "gguf"], "unknown export format"),
])
def test_compress_refuses_options_its_path_ignores(model_dir, tmp_path, args, msg):  # noqa: F811
    r = runner.invoke(app, ["compress", str(model_dir / "tiny"), *args, "--out", str(tmp_path / "o"), *small(model_dir)])
    assert r.exit_code == 2 and msg in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "o").exists()  # refused before anything was written


def test_quant_levels_on_one_reference_level_cli(model_dir, tmp_path):  # noqa: F811
    r = runner.invoke(app, ["search", str(model_dir / "tiny"), "--levels", "2,3,4", "--group-size", "32",
                            "--target-bits", "3", "--sequential-level", "w3", "--allocator", "dp", "--no-eval",
                            "--db", str(tmp_path / "db"), "--out", str(tmp_path / "o"), *small(model_dir)])
    assert r.exit_code == 0, r.output
    meta = json.loads((tmp_path / "db" / "db.json").read_text())
    assert meta["kind"]["settings"]["sequential_level"] == 3


def test_lowrank_search_cli(model_dir, tmp_path):  # noqa: F811
    out = tmp_path / "lr"
    r = runner.invoke(app, ["search", str(model_dir / "tiny"), "--kind", "lowrank", "--ratios", "0.25,0.5,0.75",
                            "--target-mb", "0.22", "--allocator", "dp", "--db", str(tmp_path / "db"), "--out", str(out),
                            *small(model_dir)])
    assert r.exit_code == 0, r.output
    plan = json.loads((out / "plan.json").read_text())
    assert plan["kind"] == "lowrank" and plan["info"]["cost"] <= plan["info"]["budget_cost"]
    assert (out / "weights.safetensors").stat().st_size <= 0.22e6
    r = runner.invoke(app, ["search", str(model_dir / "tiny"), "--kind", "quant", "--ratios", "0.5", "--target-bits", "3",
                            "--no-eval", *small(model_dir)])
    assert r.exit_code == 2 and "--ratios does not apply to --kind quant" in r.output


def test_search_verb_and_presets_in_python(model_dir, tmp_path):  # noqa: F811
    """modelpress.search with a SearchConfig, and the CPU preset compress uses."""
    import modelpress as mp
    from modelpress.allocate.budget import Budget
    from modelpress.data import DataConfig
    from modelpress.errors import ConfigError
    from modelpress.models import load_model
    from modelpress.presets import budget_config

    m, tok = load_model(str(model_dir / "tiny"))
    data = DataConfig(corpus=str(model_dir / "text.txt"), n_samples=4, seq_len=64)
    cfg = mp.SearchConfig(Budget("bits", 3), kind_settings={"levels": (2, 3, 4), "group_size": 32},
                          allocator="dp", compare=("uniform",), data=data, out=tmp_path / "o", evaluate=False,
                          db=tmp_path / "db")
    assert cfg.kind == "quant"  # the default kind of a bits budget
    rep = mp.search(m, tok, cfg)
    assert [r["label"] for r in rep["rows"]] == ["uniform", "dp"] and (tmp_path / "o" / "plan.json").is_file()
    preset = budget_config(Budget("bits", 3.5), machine="cpu", corpus=str(model_dir / "text.txt"), n_samples=4,
                           seq_len=64)
    assert preset.kind_settings["sequential_level"] == 3 and preset.compare == ("uniform",)
    assert preset.allocator_settings["generations"] == 12 and preset.fitness.fitness_windows == 16
    assert budget_config(Budget("sparsity", 0.5)).kind == "sparsity"
    with pytest.raises(ConfigError, match="unknown allocator"):
        mp.SearchConfig(Budget("bits", 3), allocator="nope")
    with pytest.raises(ConfigError, match="machine preset"):
        budget_config(Budget("bits", 3), machine="tpu")


def test_search_serve_vllm_cli(model_dir, tmp_path):  # noqa: F811
    pytest.importorskip("compressed_tensors")
    r = runner.invoke(app, ["search", str(model_dir / "tiny"), "--levels", "4,8", "--sym", "--serve", "vllm",
                            "--group-size", "32", "--target-bits", "6", "--allocator", "dp", "--no-eval",
                            "--export", "compressed-tensors", "--db", str(tmp_path / "db"), "--out", str(tmp_path / "o"),
                            *small(model_dir)])
    assert r.exit_code == 0, r.output
    plan = json.loads((tmp_path / "o" / "plan.json").read_text())["levels"]
    assert plan["model.layers.0.self_attn.q_proj"] == plan["model.layers.0.self_attn.v_proj"]
    assert (tmp_path / "o-ct" / "config.json").is_file()
    rep = json.loads((tmp_path / "o" / "report.json").read_text())
    assert rep["export"]["format"] == "compressed-tensors" and all("Marlin" in s["vllm"] for s in rep["export"]["schemes"])
    assert "vLLM kernel" in r.output
    r = runner.invoke(app, ["search", str(model_dir / "tiny"), "--levels", "2,3,4", "--serve", "vllm",
                            "--target-bits", "3", "--no-eval", *small(model_dir)])
    assert r.exit_code == 2 and "no fast kernel" in r.output


def test_search_fitness_measures_on_windows_the_levels_never_saw(model_dir, tmp_path, monkeypatch):  # noqa: F811
    """By default the fitness and validation windows are the source's windows after the database's
    calibration windows (disjoint from them); held_out=False measures on the calibration windows."""
    import importlib

    import torch

    import modelpress as mp
    from modelpress.allocate.budget import Budget
    from modelpress.data import DataConfig, get_windows
    from modelpress.eval import fitness as fitness_mod
    from modelpress.models import load_model
    from modelpress.search import SearchSettings

    seen = []

    class Recording(fitness_mod.KLFitness):
        def __init__(self, model, state, problem, ids, **kw):
            seen.append(torch.cat([ids, kw["validation"]]))
            super().__init__(model, state, problem, ids, **kw)

    monkeypatch.setattr(importlib.import_module("modelpress.search"), "KLFitness", Recording)  # the module, not mp.search
    data = DataConfig(corpus=str(model_dir / "text.txt"), n_samples=4, seq_len=64)
    for held_out in (True, False):
        m, tok = load_model(str(model_dir / "tiny"))  # search leaves its plan in the model
        cfg = mp.SearchConfig(Budget("bits", 3), kind_settings={"levels": (2, 3, 4), "group_size": 32},
                              allocator="evolutionary", allocator_settings=dict(generations=1, offspring=2,
                                                                                tokens=(64,), survivors=(1,)),
                              data=data, out=tmp_path / f"o{held_out}", evaluate=False, db=tmp_path / "db",
                              fitness=SearchSettings(fitness_windows=3, validation_windows=1, held_out=held_out))
        mp.search(m, tok, cfg)
    held, same = seen
    cal = get_windows(tok, data)
    after = get_windows(tok, DataConfig(corpus=data.corpus, n_samples=4, seq_len=64), after=4)
    assert torch.equal(held, after.calib) and torch.equal(same, cal.calib)
    spans = lambda w: {range(s, s + 64) for _, s in w.calib_starts}  # noqa: E731
    assert all(not set(a) & set(b) for a in spans(after) for b in spans(cal))  # no token in both


def test_gguf_search_starts_from_a_llama_cpp_preset(model_dir, tmp_path, caplog):  # noqa: F811
    import logging

    from modelpress.export import llamacpp

    if not llamacpp.available():
        pytest.skip("needs llama.cpp's library")
    tiny, preset = str(model_dir / "tiny"), tmp_path / "p.gguf"
    r = runner.invoke(app, ["export", "gguf", tiny, "--preset", "Q4_0", "--out", str(preset)])
    assert r.exit_code == 0, r.output
    mb = preset.stat().st_size / 1e6
    args = ["search", tiny, "--kind", "gguf", "--types", "Q4_0,Q5_1,Q8_0", "--target-mb", f"{mb:.6f}", "--no-eval",
            "--generations", "1", "--offspring", "2", "--db", str(tmp_path / "db"), *small(model_dir)]
    with caplog.at_level(logging.INFO, logger="modelpress.allocate.evolutionary"):
        r = runner.invoke(app, [*args, "--start-from", str(preset), "--out", str(tmp_path / "s.gguf")])
    assert r.exit_code == 0, r.output
    assert any(m.startswith("init:") and str(preset) in m for m in caplog.messages)  # scored among the starts
    rep = json.loads((tmp_path / "s.report" / "report.json").read_text())
    assert rep["fitness"]["start"] in (str(preset), "uniform", "dp") and "start (" in r.output
    assert (tmp_path / "s.gguf").stat().st_size <= mb * 1e6
    for extra, msg in ((["--start-from", str(tmp_path / "none.gguf")], "no such file"),
                       (["--start-from", str(preset), "--allocator", "dp"], "starts the evolutionary allocator"),
                       (["--start-from", str(preset), "--init", "uniform"], "start plans are scored with init")):
        r = runner.invoke(app, [*args, *extra, "--out", str(tmp_path / "x.gguf")])
        assert r.exit_code == 2 and msg in r.output, r.output


def test_start_from_and_plan_exclude_each_other():
    import modelpress as mp
    from modelpress.allocate.budget import Budget
    from modelpress.errors import ConfigError

    with pytest.raises(ConfigError, match="--plan applies a plan without searching"):
        mp.SearchConfig(Budget("bits", 3), plan_file="plan.json", start_from=("p.gguf",))
