import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from modelpress.export import checkpoint as ck
from modelpress.utils.dist import reduce_int, without_option, world
from tests.conftest import byte_tokenizer, tiny_model
from tests.models.test_moe import tiny_moe


def _tensors(path):
    out = {}
    for f in ck.weight_files(ck.read_manifest(path)):
        out.update(load_file(str(path / f)))
    return out


def test_a_failed_solve_reaches_the_other_ranks_as_the_error_it_was():
    import pickle

    from modelpress.calib.driver import _Failed
    from modelpress.errors import DataError

    got = pickle.loads(pickle.dumps(_Failed(DataError("layer x: no tokens"))))
    assert type(got.remade()) is DataError and str(got.remade()) == "layer x: no tokens"

    class Odd(Exception):
        def __init__(self, a, b):  # not picklable as it is
            super().__init__(a)

    other = pickle.loads(pickle.dumps(_Failed(Odd("boom", 1)))).remade()
    assert isinstance(other, RuntimeError) and "another worker's solve failed: Odd: boom" in str(other)


def test_one_process_is_a_world_of_one():
    assert world() == (0, 1) and reduce_int(7, "max") == 7
    assert without_option(["a", "--workers", "2", "b", "--workers=3"], "--workers") == ["a", "b"]


@pytest.mark.parametrize("arch,method", [("llama", ["--method", "gptq", "--bits", "3", "--group-size", "32"]),
                                         ("llama", ["--method", "sparsegpt", "--sparsity", "0.5", "--no-sequential"]),
                                         ("mixtral", ["--method", "gptq", "--bits", "4", "--group-size", "32"]),
                                         ("llama", ["--method", "gptq", "--bits", "4", "--stream"]),
                                         ("llama", ["--method", "gptq", "--bits", "4", "--n-samples", "8"])])
def test_two_gloo_workers_write_the_checkpoint_one_process_writes(tmp_path, arch, method):
    """Data-parallel calibration: 3 batches dealt to 2 ranks (2 + 1), statistics summed across
    them before each solve, each layer solved by one rank and adopted by the other (layers fed the
    same input side by side). The checkpoint equals the one-process one bit for bit, for true-
    sequential GPTQ, SparseGPT on dense inputs, a MoE whose experts some rank never feeds, and a
    streamed model (blocks from disk one at a time, rank 0 writing the checkpoint block by block)."""
    src = tmp_path / "model"
    (tiny_moe(arch) if arch == "mixtral" else tiny_model(arch)).save_pretrained(src)
    byte_tokenizer().save_pretrained(src)
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"line {i}: the quick brown fox {i * 7 % 13} jumps over {i % 5} lazy dogs." for i in range(400)))
    samples = [] if "--n-samples" in method else ["--n-samples", "24"]  # 8: one batch, rank 1 gets none
    args = ["compress", str(src), *method, "--data", str(text), *samples, "--seq-len", "64", "--no-eval"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "modelpress", *args, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "modelpress", *args, "--workers", "2", "--out", str(tmp_path / "two"),
                          "--verbose"], capture_output=True, text=True, env=env, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    # the solves were shared out: each rank solved its part of the layers, the others adopted them
    shares = sorted(re.findall(r"worker (\d) of 2 solved (\d+) of the (\d+) layers", two.stderr))
    assert [r for r, _, _ in shares] == ["0", "1"], two.stderr[-3000:]
    total = int(shares[0][2])
    assert all(0 < int(k) < total for _, k, _ in shares) and sum(int(k) for _, k, _ in shares) == total
    a, b = _tensors(tmp_path / "one"), _tensors(tmp_path / "two")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = ck.read_manifest(tmp_path / "one"), ck.read_manifest(tmp_path / "two")
    assert ma["units"] == mb["units"]
    assert ma["plan"].get("isotropic_experts") == mb["plan"].get("isotropic_experts")
    assert not list(tmp_path.glob("two*/.*tmp*"))  # one writer: nothing half-made beside it


@pytest.mark.parametrize("kind", [["--kind", "quant", "--levels", "2,3,4", "--group-size", "32", "--target-bits", "3"],
                                  ["--kind", "sparsity", "--max-sparsity", "0.7", "--target-sparsity", "0.5"],
                                  ["--kind", "quant", "--levels", "2,3,4", "--group-size", "32", "--target-bits", "3",
                                   "--init", "sensitivity"],
                                  ["--kind", "quant", "--levels", "2,3,4", "--group-size", "32", "--target-bits", "3",
                                   "--stream"]])
def test_two_gloo_workers_build_the_database_and_find_the_plan_one_process_finds(tmp_path, kind):
    """Level database (data-parallel calibration; the layers' solves shared out, each unit written
    by the rank that solved it; per-unit data merged into db.json) and the evolutionary search
    (offspring and, with --init sensitivity, the one-at-a-time measurements scored across ranks):
    same files, same db.json units, same plan; also for a streamed model (blocks on disk)."""
    import json

    src = tmp_path / "model"
    tiny_model("llama").save_pretrained(src)
    byte_tokenizer().save_pretrained(src)
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"line {i}: the quick brown fox {i * 7 % 13} jumps over {i % 5} lazy dogs." for i in range(400)))
    args = ["search", str(src), *kind, "--generations", "3", "--offspring", "5", "--tokens", "64,128", "--survivors", "2,1", "--fitness-windows", "6",
            "--data", str(text), "--n-samples", "12", "--seq-len", "64", "--no-eval"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name, extra in (("one", []), ("two", ["--workers", "2"])):
        r = subprocess.run([sys.executable, "-m", "modelpress", *args, *extra, "--db", str(tmp_path / f"db-{name}"),
                            "--out", str(tmp_path / name)], capture_output=True, text=True, env=env, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
    plans = [json.loads((tmp_path / n / "plan.json").read_text())["levels"] for n in ("one", "two")]
    assert plans[0] == plans[1]
    # the searches scored the same offspring the same, and their parents were mixed plans (the
    # plan returned is the one validated best, which may be the uniform start)
    hist = [json.loads((tmp_path / n / "report.json").read_text())["history"] for n in ("one", "two")]
    assert hist[0] == hist[1] and any(len(set(h["parent"])) > 1 for h in hist[0])
    units = [json.loads((tmp_path / d / "db.json").read_text())["units"] for d in ("db-one", "db-two")]
    assert units[0] == units[1]
    files = sorted(p.name for p in (tmp_path / "db-one" / "units").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "db-two" / "units").iterdir()) and files
    if kind[1] == "quant" and "--init" not in kind and "--stream" not in kind:  # a search of another problem on the same database: rank 0 alone moves the old one aside
        r = subprocess.run([sys.executable, "-m", "modelpress", *args[:args.index("--offspring") + 1], "4",
                            *args[args.index("--offspring") + 2:], "--workers", "2", "--db", str(tmp_path / "db-two"),
                            "--out", str(tmp_path / "again")], capture_output=True, text=True, env=env, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        assert len(list((tmp_path / "db-two" / "searches").glob("*.json"))) == 2
    for f in files:  # (the bytes of a header are not comparable: safetensors writes its metadata in hash order)
        a, b = (safe_open(str(tmp_path / d / "units" / f), "pt") for d in ("db-one", "db-two"))
        assert a.metadata() == b.metadata() and a.keys() == b.keys(), f
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys()), f


def test_workers_refuse_what_runs_in_one_process(tmp_path):
    from typer.testing import CliRunner

    from modelpress.cli.main import app

    r = CliRunner(env={"WORLD_SIZE": "2"}).invoke(app, ["eval", "smollm2-135m"])
    assert r.exit_code == 2 and "runs in one process" in r.output
