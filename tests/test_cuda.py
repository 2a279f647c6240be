"""The same jobs on a GPU as on the CPU: every operator, the search, the KV caches, the gradient
compressors, BitStack, the CLI and an NCCL training run. Skipped where CUDA is absent (CI); run on a
GPU machine with `pytest tests/test_cuda.py`.

Each test runs the job on both devices and checks that the GPU result is a correct one (on the
right device, loadable on the CPU, same bytes) and of the same quality as the CPU's (numerics differ
in the last bits, so greedy choices may too; quality is compared, not bits)."""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

import modelpress as mp
from modelpress.allocate.budget import Budget, make_problem
from modelpress.cli.main import app
from modelpress.comm import COMPRESSORS, exchange
from modelpress.kvcache import kv_evaluate, kv_generate
from modelpress.search import allocate, materialize, open_database
from tests.cli.test_cli import model_dir, small  # noqa: F401  (fixture)
from tests.conftest import tiny_model
from tests.export.test_checkpoint import windows

# MODELPRESS_TEST_GPU=cpu runs the module on the CPU (to check the tests themselves)
CUDA = torch.device(os.environ.get("MODELPRESS_TEST_GPU", "cuda"))
pytestmark = pytest.mark.skipif(CUDA.type == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU")

OPS = [("gptq", dict(bits=4, group_size=32)), ("gptq", dict(bits=3, group_size=48, act_order=True)),
       ("rtn", dict(bits=2, group_size=16)), ("sparsegpt", dict(sparsity=0.6)), ("sparsegpt", dict(pattern="2:4")),
       ("wanda", dict(pattern="2:4")), ("magnitude", dict(sparsity=0.5)), ("svd", dict(rank=8)),
       ("asvd", dict(rank=8)), ("gptq+eora", dict(bits=2, group_size=32)), ("sparsegpt+eora", dict(sparsity=0.6))]


def _kl(model, w, ref):
    return mp.evaluate(model, w.eval, reference=ref).kl


@pytest.mark.parametrize("method,kw", OPS, ids=[f"{m}-{i}" for i, (m, _) in enumerate(OPS)])
def test_operator_on_gpu_matches_cpu_quality_and_round_trips(method, kw, tmp_path):
    w = windows()
    name, comp = (method.split("+") + [None])[:2]
    extra = dict(compensate=comp, rank=4) if comp else {}
    ref = tiny_model("llama")
    cpu = tiny_model("llama")
    c_cpu = mp.compress(cpu, None, name, data=w, **extra, **kw)
    gpu = tiny_model("llama").to(CUDA)
    c_gpu = mp.compress(gpu, None, name, data=w, **extra, **kw)
    assert all(p.device.type == CUDA.type for p in gpu.parameters())
    assert c_gpu.bits_per_weight() == pytest.approx(c_cpu.bits_per_weight())
    kl_cpu, kl_gpu = _kl(cpu, w, ref), _kl(gpu, w, ref.to(CUDA))
    assert kl_gpu <= 1.2 * kl_cpu + 1e-3, (kl_gpu, kl_cpu)
    c_gpu.save(tmp_path / "ck")
    back = mp.load_compressed(tmp_path / "ck", device="cpu")
    with torch.no_grad():
        a, b = gpu(w.eval.to(CUDA)).logits.cpu(), back(w.eval).logits
    assert torch.allclose(a, b, atol=1e-3, rtol=1e-3)


def test_drop_on_gpu_picks_the_cpu_blocks():
    w = windows()
    c_cpu = mp.compress(tiny_model("llama", layers=4), None, None, data=w, drop=3)
    c_gpu = mp.compress(tiny_model("llama", layers=4).to(CUDA), None, None, data=w, drop=3)
    assert sorted(c_gpu.dropped) == sorted(c_cpu.dropped)


@pytest.mark.parametrize("kind,settings,budget", [
    ("quant", dict(levels=(2, 3, 4), group_size=16), Budget("bits", 3.0)),
    ("sparsity", dict(max_sparsity=0.8, max_levels=5), Budget("sparsity", 0.5)),
    ("joint", dict(bits=(2, 3, 4), sparsity=(0.0, 0.5), ranks=(0, 4), group_size=16, allow_drop=True), None)])
def test_search_on_gpu_meets_the_budget(kind, settings, budget, tmp_path):
    w = windows()
    m = tiny_model("llama").to(CUDA)
    db = open_database(m, None, kind, data=w, db=tmp_path / "db", **settings)
    if budget is None:
        p = make_problem(db, Budget("mb", 0.3))
        budget = Budget("mb", (db.meta["fixed_bytes"] + (p.min_cost() + p.max_cost()) / 2) / 1e6)
    res = allocate(m, db, budget, "evolutionary", data=w, generations=4, offspring=4, tokens=(32, 64))
    prob = make_problem(db, budget)
    assert prob.cost(res.plan.choice(prob)) <= prob.budget
    materialize(m, None, db, res.plan)
    assert all(p.device.type == CUDA.type for p in m.parameters())
    assert _kl(m, w, tiny_model("llama").to(CUDA)) < 1.0


KV = [("full", {}), ("kivi", dict(bits=2, window=8, group=8)), ("gear", dict(bits=2, window=8, group=8)),
      ("zipcache", dict(window=8, group=8)), ("streamingllm", dict(budget=16, window=4)),
      ("h2o", dict(budget=16, window=4)), ("snapkv", dict(budget=16, window=4)), ("ems", dict(budget=16, window=4)),
      ("kivi", dict(bits=2, window=8, group=8, storage="float16"))]


@pytest.mark.parametrize("name,kw", KV, ids=[f"{n}-{i}" for i, (n, _) in enumerate(KV)])
def test_kv_cache_on_gpu(name, kw):
    ids = torch.randint(3, 256, (2, 48), generator=torch.Generator().manual_seed(0))
    cpu = tiny_model("llama", layers=2)
    gpu = copy.deepcopy(cpu).to(CUDA)
    r_cpu = kv_evaluate(cpu, ids, name, prefill=16, **kw)
    r_gpu = kv_evaluate(gpu, ids.to(CUDA), name, prefill=16, **kw)
    assert r_gpu["ppl"] == pytest.approx(r_cpu["ppl"], rel=2e-2)
    out, cache = kv_generate(gpu, ids[:1].to(CUDA), name, max_new_tokens=6, **kw)
    assert out.device.type == CUDA.type and out.shape[1] == 54
    assert 0 < cache.nbytes() <= cache.full_nbytes()


@pytest.mark.parametrize("name,kw", [("topk", dict(ratio=0.05)), ("randk", dict(ratio=0.05)), ("qsgd", dict(bits=4)),
                                     ("sign", {}), ("fp16", {})])
def test_gradient_compressors_on_gpu(name, kw):
    x = torch.randn(64, 48, generator=torch.Generator().manual_seed(0))
    c = COMPRESSORS.build(name, **kw)
    p_cpu, p_gpu = c.compress(x, {}), c.compress(x.to(CUDA), {})
    assert all(t.device.type == CUDA.type for t in p_gpu.values())
    assert c.nbytes(p_gpu) == c.nbytes(p_cpu)
    y_cpu, y_gpu = c.decompress(p_cpu, x, {}), c.decompress(p_gpu, x.to(CUDA), {})
    assert y_gpu.device.type == CUDA.type
    if name not in ("randk", "qsgd"):  # the random ones draw on the CPU generator and agree too, but allow ties
        assert torch.allclose(y_gpu.cpu(), y_cpu, atol=1e-3, rtol=1e-3)
    assert (y_gpu.cpu() - x).norm() <= (y_cpu - x).norm() * 1.05 + 1e-6


def test_powersgd_exchange_on_gpu():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(40, 3, generator=g) @ torch.randn(3, 30, generator=g)
    avg, local, sent = exchange([(COMPRESSORS.build("powersgd", rank=4), m.to(CUDA), {})])
    assert avg[0].device.type == CUDA.type and torch.allclose(avg[0].cpu(), m, atol=1e-3)
    assert sent == 4 * 4 * (40 + 30)


def test_bitstack_on_gpu(tmp_path):
    from modelpress.export.bitstack import BitStackConfig, build_bitstack, load_bitstack, size_range_mb

    w = windows()
    cfg = BitStackConfig(max_blocks=4, rank=2)
    man_cpu = build_bitstack(tiny_model("llama"), None, w, tmp_path / "c", cfg)
    man_gpu = build_bitstack(tiny_model("llama").to(CUDA), None, w, tmp_path / "g", cfg)
    lo, hi = size_range_mb(man_gpu)
    assert size_range_mb(man_cpu) == pytest.approx((lo, hi))
    ref = tiny_model("llama").to(CUDA)
    m_g, _, info = load_bitstack(tmp_path / "g", (lo + hi) / 2, device=CUDA)
    m_c, _, _ = load_bitstack(tmp_path / "c", (lo + hi) / 2, device=CUDA)
    assert info["size_mb"] <= (lo + hi) / 2
    assert _kl(m_g, w, ref) <= 1.2 * _kl(m_c, w, ref) + 1e-3


def test_cli_compress_on_gpu(model_dir, tmp_path):  # noqa: F811
    out = tmp_path / "ck"
    r = CliRunner(env={"COLUMNS": "200"}).invoke(app, [
        "compress", str(model_dir / "tiny"), "--method", "gptq", "--bits", "4", "--group-size", "32",
        "--device", CUDA.type, "--out", str(out), *small(model_dir)])
    assert r.exit_code == 0, r.output
    rep = json.loads((out / "report.json").read_text())
    assert 0 < rep["rows"][1]["kl"] < 0.1


def test_nccl_training_with_compression_and_lgreco(tmp_path):
    out = tmp_path / "log.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "-m", "modelpress.comm.train",
           "--compressor", "topk", "--ratio", "0.05", "--ef", "ef", "--lgreco", "0.02,0.05,0.1", "--lgreco-every", "10",
           "--steps", "30", "--hidden", "64", "--layers", "2", "--seq", "64", "--out-json", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])))
    assert r.returncode == 0, r.stderr[-3000:]
    log = json.loads(out.read_text())
    assert log  # rank 0 wrote its log
