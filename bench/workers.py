"""One process against data-parallel workers (torch.distributed, gloo) on smollm2-135m.

Each row runs the same `modelpress` command in fresh processes: once alone (all cores), once with
`--workers N` (torchrun, each worker `cores / N` OpenMP threads), and reports both wall times and
their ratio; and once more alone with `cores / N` threads, the reference the workers' checkpoint
(and, for a search, plan) must equal bit for bit. CPU matmul kernels may split their sums by thread,
so results equal across worker counts at equal threads per process (on GPUs: per device).
On a 2-core CPU the workers share the cores the single process already uses, so the ratio shows
the overhead of the split against what it shares out (each layer's solve runs on one rank, layers
fed the same input side by side), not a speed-up from more hardware; on GPUs each worker has its
own device. Wall times on a shared machine are noisy. Rows:
bench/results/workers.json.

    python bench/workers.py [--only SUBSTRING] [--force] [--render] [--workers 2]
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, SCRATCH, RowCache, bench_args, machine, measure_rows, print_table, write_section

DATA = ["--data", "mix", "--n-samples", "64", "--seq-len", "512"]
ROWS = {
    "compress gptq w4 g64": ["compress", "smollm2-135m", "--method", "gptq", "--bits", "4", "--group-size", "64",
                             *DATA, "--no-eval"],
    "compress sparsegpt 50%": ["compress", "smollm2-135m", "--method", "sparsegpt", "--sparsity", "0.5",
                               *DATA, "--no-eval"],
    "search 3.5 bits (levels 3/4, 4 generations)": [
        "search", "smollm2-135m", "--kind", "quant", "--levels", "3,4", "--group-size", "64", "--target-bits", "3.5",
        "--generations", "4", "--offspring", "8", "--tokens", "1024,4096", "--survivors", "2,1",
        "--fitness-windows", "16", *DATA[:2], "--n-samples", "32", "--seq-len", "512", "--no-eval"],
}


def _tensors_equal(a: Path, b: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    from modelpress.export import checkpoint as ck

    def load(p):
        out = {}
        for f in ck.weight_files(ck.read_manifest(p)):
            out.update(load_file(str(p / f)))
        return out

    x, y = load(a), load(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def run(args: list[str], workers: int, out: Path, threads: int | None = None) -> float:
    if out.exists():
        shutil.rmtree(out)
    extra = ["--out", str(out)] + (["--db", str(out) + "-db"] if args[0] == "search" else [])
    if args[0] == "search" and Path(str(out) + "-db").exists():
        shutil.rmtree(str(out) + "-db")
    cmd = [sys.executable, "-m", "modelpress", *args, *extra] + (["--workers", str(workers)] if workers > 1 else [])
    env = dict(os.environ) | ({"OMP_NUM_THREADS": str(threads)} if threads else {})
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
    return time.time() - t0


def _same(a: Path, b: Path, search: bool) -> bool:
    if not _tensors_equal(a, b):
        return False
    return not search or json.loads((a / "plan.json").read_text())["levels"] == json.loads(
        (b / "plan.json").read_text())["levels"]


def measure(args: list[str], workers: int) -> dict:
    one, many, ref = SCRATCH / "workers-1", SCRATCH / f"workers-{workers}", SCRATCH / "workers-ref"
    threads = max(1, (os.cpu_count() or 1) // workers)
    t1 = run(args, 1, one)
    tn = run(args, workers, many)
    run(args, 1, ref, threads=threads)
    search = args[0] == "search"
    return {"workers": workers, "one_s": t1, "many_s": tn, "threads": threads,
            "identical": _same(ref, many, search), "threads_matter": not _same(ref, one, search), "machine": machine()}


def main() -> None:
    args = bench_args(__doc__, extra=lambda p: p.add_argument("--workers", type=int, default=2))
    cache = RowCache("workers", force=args.force)
    measure_rows(cache, ROWS, args, lambda cmd: measure(cmd, args.workers))
    render(cache.everything())


def render(cache: RowCache) -> None:
    rows = []
    for key in ROWS:
        r = cache.get(key)
        if r:
            rows.append({"run": key, "workers": r["workers"], "one_s": r["one_s"], "many_s": r["many_s"],
                         "ratio": r["many_s"] / r["one_s"], "identical": "yes" if r["identical"] else "NO",
                         "threads": "yes" if r["threads_matter"] else "no"})
    cols = [("run", "run"), ("workers", "workers"), ("one_s", "1 process s"), ("many_s", "workers s"),
            ("ratio", "workers / 1 process"),
            ("identical", "workers' result = 1 process at the same threads per process"),
            ("threads", "1 process: all cores vs cores / N threads differ")]
    md = print_table(rows, cols)
    body = ("## Data-parallel workers (`bench/workers.py`)\n\n"
            "smollm2-135m, `--data mix`, each command once in one process and once with `--workers N` (torchrun, "
            "gloo; each worker gets cores / N threads), fresh processes, model load and calibration text included. "
            "On this 2-core CPU the workers share the cores one process already uses, so the ratio weighs the cost "
            "of the split against what it shares out (each layer solved by one rank and handed to the others; layers "
            "fed the same input, q/k/v and gate/up, side by side in a true-sequential pass; every layer of a block "
            "on dense inputs), not a speed-up from more hardware; wall times are noisy. The identity column compares the workers' checkpoint (and plan) bit for bit with one process "
            "run at the workers' thread count; the last column says whether one process's own result changes with "
            "its thread count (CPU matmul kernels may split their sums by thread). "
            f"Machine: {next((r['machine'] for r in cache.rows.values() if r.get('machine')), None) or machine()}."
            "\n\n" + md)
    write_section("workers", body)


if __name__ == "__main__":
    main()
