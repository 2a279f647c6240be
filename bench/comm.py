"""Compressed data-parallel training: 2 gloo processes, same model, data and steps for every row.

Each row is `torchrun --nproc_per_node 2 -m modelpress.comm.train ...` on a small Llama-style byte
LM trained on `pydoc`; rows are cached in bench/results/comm.json (an interrupted run resumes).
Writes the table into docs/benchmarks.md and the loss-vs-bytes plot into docs/comm_loss_bytes.png.

    python bench/comm.py [--steps 400] [--force]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

from common import ROOT, RowCache, machine, print_table, write_section

ROWS = [
    ("uncompressed (DDP all-reduce)", []),
    ("fp16", ["--compressor", "fp16"]),
    ("PowerSGD r4 (torch hook, peer)", ["--compressor", "torch-powersgd", "--psgd-rank", "4"]),
    ("PowerSGD r4 (modelpress)", ["--compressor", "powersgd", "--psgd-rank", "4", "--ef", "ef"]),
    ("PowerSGD r2 (modelpress)", ["--compressor", "powersgd", "--psgd-rank", "2", "--ef", "ef"]),
    ("PowerSGD r1 (modelpress)", ["--compressor", "powersgd", "--psgd-rank", "1", "--ef", "ef"]),
    ("Top-K 0.5% + EF", ["--compressor", "topk", "--ratio", "0.005", "--ef", "ef"]),
    ("Top-K 1% + EF", ["--compressor", "topk", "--ratio", "0.01", "--ef", "ef"]),
    ("Top-K 2% + EF", ["--compressor", "topk", "--ratio", "0.02", "--ef", "ef"]),
    ("Top-K 1% + EF21", ["--compressor", "topk", "--ratio", "0.01", "--ef", "ef21"]),
    ("Top-K 1% + EControl η=0.03", ["--compressor", "topk", "--ratio", "0.01", "--ef", "econtrol", "--eta", "0.03"]),
    ("Top-K 1% + EControl η=0.1", ["--compressor", "topk", "--ratio", "0.01", "--ef", "econtrol", "--eta", "0.1"]),
    ("Top-K 1% + EControl η=0.5", ["--compressor", "topk", "--ratio", "0.01", "--ef", "econtrol", "--eta", "0.5"]),
    ("Top-K 10% + EF", ["--compressor", "topk", "--ratio", "0.1", "--ef", "ef"]),
    ("QSGD 4-bit", ["--compressor", "qsgd", "--bits", "4"]),
    ("1-bit Adam (warm-up 40)", ["--optimizer", "onebit-adam", "--warmup", "40"]),
    ("L-GreCo PowerSGD r∈{1,2,4,8} (base r4)", ["--compressor", "powersgd", "--psgd-rank", "4", "--ef", "ef",
                                                "--lgreco", "1,2,4,8", "--lgreco-every", "50"]),
    ("L-GreCo Top-K {0.5,1,2,5}% + EF (base 1%)", ["--compressor", "topk", "--ratio", "0.01", "--ef", "ef",
                                                  "--lgreco", "0.005,0.01,0.02,0.05", "--lgreco-every", "50"]),
    ("L-GreCo PowerSGD r∈{1,2,4,8} (base r4), relative errors", [
        "--compressor", "powersgd", "--psgd-rank", "4", "--ef", "ef", "--lgreco", "1,2,4,8", "--lgreco-every", "50",
        "--lgreco-relative"]),
    ("L-GreCo Top-K {0.5,1,2,5}% + EF (base 1%), relative errors", [
        "--compressor", "topk", "--ratio", "0.01", "--ef", "ef", "--lgreco", "0.005,0.01,0.02,0.05",
        "--lgreco-every", "50", "--lgreco-relative"]),
    ("L-GreCo Top-K {0.5,1,2,5,10}% + EF (base 2%)", ["--compressor", "topk", "--ratio", "0.02", "--ef", "ef",
                                                     "--lgreco", "0.005,0.01,0.02,0.05,0.1", "--lgreco-every", "50"]),
    ("L-GreCo Top-K {1,2,4,8,16}% + EF (base 4%)", ["--compressor", "topk", "--ratio", "0.04", "--ef", "ef",
                                                   "--lgreco", "0.01,0.02,0.04,0.08,0.16", "--lgreco-every", "50"]),
    ("L-GreCo PowerSGD r∈{1,2,4,8} (base r2)", ["--compressor", "powersgd", "--psgd-rank", "2", "--ef", "ef",
                                                "--lgreco", "1,2,4,8", "--lgreco-every", "50"]),
]


def _flag(args: list[str], flag: str) -> str | None:
    """The value after `flag` in a row's arguments, or None."""
    return args[args.index(flag) + 1] if flag in args else None


def dominated(cache: RowCache) -> str:
    """Each L-GreCo row against the uniform rows of its compressor: which it beats on both loss and bytes."""
    out = []
    for label, extra in ROWS:
        r = cache.get(label)
        if r is None or "--lgreco" not in extra:
            continue
        comp = _flag(extra, "--compressor")
        uni = [(lab, cache.get(lab)) for lab, ex in ROWS if "--lgreco" not in ex and cache.get(lab)
               and _flag(ex, "--compressor") == comp and _flag(ex, "--ef") == "ef"]
        beats = [lab for lab, u in uni if u["total_bytes"] > r["total_bytes"] and u["final_loss"] >= r["final_loss"]]
        out.append(f"- {label}: {r['final_loss']:.3f} at {r['total_bytes'] / 1e6:.2f} MB; fewer bytes at equal "
                   f"or lower loss than: {', '.join(beats) if beats else 'none of the uniform rows'}.")
    return "L-GreCo against the uniform settings of the same compressor (+ EF):\n" + "\n".join(out) + "\n" if out else ""
COLUMNS = [("label", "method"), ("final_loss", "final loss"), ("loss_ratio", "× uncompressed"),
           ("total_mb", "MB sent / worker"), ("ratio", "compression"), ("wall_s", "wall s")]


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def run(extra: list[str], common: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "log.json")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
               "-m", "modelpress.comm.train", *common, *extra, "--out-json", out]
        t = time.time()
        subprocess.run(cmd, check=True, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"))
        log = json.loads(open(out).read())
        log["wall_s"] = time.time() - t
    return log


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args()
    common = ["--hidden", "64", "--layers", "2", "--batch", "8", "--seq", "64", "--lr", "1e-3",
              "--steps", str(args.steps)]
    cache = RowCache("comm", force=args.force)
    for label, extra in ROWS:
        if cache.get(label):
            continue
        print("==", label, flush=True)
        log = run(extra, common)
        cum, xs = 0, []
        for b in log["bytes"]:
            cum += b
            xs.append(cum)
        cache.put(label, {"label": label, "final_loss": log["final_loss"], "total_bytes": log["total_bytes"],
                          "dense_bytes": log["dense_bytes"], "wall_s": log["wall_s"], "cum_bytes": xs, "loss": log["loss"]})
    render(cache.everything(), common)


def render(cache: RowCache, common: list[str]) -> None:
    from modelpress.plots import plot_curve

    base = cache.get(ROWS[0][0])
    rows, curves = [], {}
    for label, _ in ROWS:
        r = cache.get(label)
        if r is None:
            continue
        rows.append(dict(r, total_mb=r["total_bytes"] / 1e6, ratio=r["dense_bytes"] / r["total_bytes"],
                         loss_ratio=r["final_loss"] / base["final_loss"] if base else None))
        k = 20  # moving average of the training loss
        sm = [sum(r["loss"][max(0, i - k + 1):i + 1]) / len(r["loss"][max(0, i - k + 1):i + 1]) for i in range(len(r["loss"]))]
        curves[label] = ([x / 1e6 for x in r["cum_bytes"]][::10], sm[::10])
    md = print_table(rows, COLUMNS)
    png = ROOT / "docs" / "comm_loss_bytes.png"
    plot_curve(png, curves, "MB sent per worker (cumulative, log)", "training loss (20-step mean)", logx=True, marker=None)
    body = (
        "## Gradient compression (`bench/comm.py`)\n\n"
        f"2 gloo processes on the CPU, Llama-style byte LM (`{' '.join(common)}`, "
        "tied embeddings, 123k parameters), Adam (1-bit Adam row: its own optimizer), same seed, data and steps "
        "for every row. final loss = mean training loss of the last 10 steps (both workers). MB sent = bytes one "
        "worker puts on the wire (values, indices, scales, PowerSGD factors; the uncompressed row counts the "
        "float32 gradient once per step). compression = uncompressed bytes / sent bytes. wall s includes process "
        "start-up; the two `relative errors` rows and the base-2% / base-4% / base-r2 L-GreCo rows ran beside other "
        "benchmarks, so their wall times are inflated. L-GreCo rows re-plan every 50 steps under the error of their base level; "
        "`relative errors` measures each layer's error relative to its norm (`LGreCo(relative=True)`). "
        f"Machine: {machine()}.\n\n" + md + "\n\n" + dominated(cache) + "\n![loss vs bytes](comm_loss_bytes.png)\n"
    )
    write_section("comm", body)


if __name__ == "__main__":
    main()
