import os
import subprocess
import sys

import pytest
import torch
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


def test_one_process_is_a_world_of_one():
    assert world() == (0, 1) and reduce_int(7, "max") == 7
    assert without_option(["a", "--workers", "2", "b", "--workers=3"], "--workers") == ["a", "b"]


@pytest.mark.parametrize("arch,method", [("llama", ["--method", "gptq", "--bits", "3", "--group-size", "32"]),
                                         ("llama", ["--method", "sparsegpt", "--sparsity", "0.5", "--no-sequential"]),
                                         ("mixtral", ["--method", "gptq", "--bits", "4", "--group-size", "32"])])
def test_two_gloo_workers_write_the_checkpoint_one_process_writes(tmp_path, arch, method):
    """Data-parallel calibration: 3 batches dealt to 2 ranks (2 + 1), statistics summed across
    them before each solve. The checkpoint equals the one-process one bit for bit, for true-
    sequential GPTQ, SparseGPT on dense inputs, and a MoE whose experts some rank never feeds."""
    src = tmp_path / "model"
    (tiny_moe(arch) if arch == "mixtral" else tiny_model(arch)).save_pretrained(src)
    byte_tokenizer().save_pretrained(src)
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"line {i}: the quick brown fox {i * 7 % 13} jumps over {i % 5} lazy dogs." for i in range(400)))
    args = ["compress", str(src), *method, "--data", str(text), "--n-samples", "24", "--seq-len", "64", "--no-eval"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "modelpress", *args, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "modelpress", *args, "--workers", "2", "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _tensors(tmp_path / "one"), _tensors(tmp_path / "two")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = ck.read_manifest(tmp_path / "one"), ck.read_manifest(tmp_path / "two")
    assert ma["units"] == mb["units"]
    assert ma["plan"].get("isotropic_experts") == mb["plan"].get("isotropic_experts")
    assert not list(tmp_path.glob("two*/.*tmp*"))  # one writer: nothing half-made beside it


def test_workers_refuse_what_runs_in_one_process(tmp_path):
    from typer.testing import CliRunner

    from modelpress.cli.main import app

    r = CliRunner().invoke(app, ["compress", "smollm2-135m", "--target-bits", "3", "--workers", "2"])
    assert r.exit_code == 2 and "several workers" in r.output and "--target-bits" in r.output
    r = CliRunner(env={"WORLD_SIZE": "2"}).invoke(app, ["eval", "smollm2-135m"])
    assert r.exit_code == 2 and "runs in one process" in r.output
