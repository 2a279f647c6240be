"""Low-rank, EoRA, BitStack and joint search on smollm2-135m (issue: any-size loading, one search
across kinds). Writes a table and a size–perplexity plot (docs/size_ppl.png) into docs/.

Everything is compared at the total size of uniform GPTQ 3-bit g64. Same calibration (128 x 512
tokens of pydoc) and evaluation windows (first 40 held-out windows) as bench/search.py, whose rows
(uniform / evolutionary plans at 2.5, 3, 4 bits) become points on the curve.

    python bench/lowrank.py [--only eora|bitstack|joint|plot] [--force]
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from common import DOCS, ROOT, RowCache, machine, print_table, write_section

import modelpress as mp
from modelpress.allocate.budget import Budget
from modelpress.eval import ReferenceLogprobs, evaluate
from modelpress.export.bitstack import BitStackConfig, build_bitstack, load_bitstack, size_range_mb
from modelpress.search import SearchSettings, allocate, materialize, open_database

N_EVAL = 40
EORA = [("gptq", dict(bits=3, group_size=64)), ("sparsegpt", dict(sparsity=0.5)), ("wanda", dict(pattern="2:4")),
        ("rtn", dict(bits=3, group_size=64))]
COLUMNS = [("label", "method"), ("ppl", "ppl"), ("ppl_ratio", "× dense"), ("kl", "KL to dense"),
           ("size_mb", "size MB"), ("seconds", "time s")]
JOINT = dict(bits=(2, 3, 4), sparsity=(0.0, 0.5), ranks=(0, 16), group_size=64)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default=None)
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--generations", type=int, default=30)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the machine line names the GPU)")
    ap.add_argument("--render", action="store_true", help="only re-render the table and plot from the row cache")
    args = ap.parse_args()
    cache = RowCache("lowrank", force=args.force)
    if args.render:
        render(cache, cache.get("gptq w3 g64")["size_mb"])
        return
    base, tok = mp.load_model("smollm2-135m", device=args.device)
    cache.put("machine", {"text": machine()})  # where the rows were measured (a later --render may run elsewhere)
    windows = mp.get_windows(tok, mp.DataConfig(n_samples=128, seq_len=512, n_eval=N_EVAL))
    state = {"ref": None}

    def ref():
        if state["ref"] is None:
            state["ref"] = ReferenceLogprobs(base, windows.eval)
            if not cache.get("dense"):
                d = evaluate(base, windows.eval, reference=state["ref"])
                cache.put("dense", {"label": "dense", "ppl": d.ppl, "kl": 0.0,
                                    "size_mb": sum(p.numel() for p in base.parameters()) * 2 / 1e6})
        return state["ref"]

    def run_compress(label, method, kw, comp=None, rank=16):
        if cache.get(label):
            return
        print("==", label, flush=True)
        model = copy.deepcopy(base)
        t = time.time()
        c = mp.compress(model, tok, method, data=windows, compensate=comp, rank=rank if comp else None, **kw)
        with tempfile.TemporaryDirectory() as tmp:
            c.save(Path(tmp) / "ck")
            size = mp.info(Path(tmp) / "ck")["weights_mb"]
        secs = time.time() - t
        r = evaluate(model, windows.eval, reference=ref())
        cache.put(label, {"label": label, "ppl": r.ppl, "kl": r.kl, "size_mb": size, "seconds": secs})
        del model
        gc.collect()

    if args.only in (None, "eora"):
        for method, kw in EORA:
            name = f"{method} " + (f"w{kw['bits']} g64" if "bits" in kw else kw.get("pattern") or f"{int(100 * kw['sparsity'])}%")
            run_compress(name, method, kw)
            for r in ((16, 32) if (method, kw.get("bits")) == ("gptq", 3) else (16,)):
                run_compress(f"{name} + EoRA r{r}", method, kw, comp="eora", rank=r)
    target = (cache.get("gptq w3 g64") or {}).get("size_mb")
    if target is None:
        run_compress("gptq w3 g64", "gptq", dict(bits=3, group_size=64))
        target = cache.get("gptq w3 g64")["size_mb"]

    bs_dir = ROOT / ".bench_cache" / "bitstack-smollm2"
    if args.only in (None, "bitstack", "plot"):
        if not (bs_dir / "modelpress.json").is_file():
            t = time.time()
            build_bitstack(copy.deepcopy(base), tok, windows, bs_dir, BitStackConfig(max_blocks=8, rank=4))
            cache.put("bitstack|build", {"seconds": time.time() - t})
        manifest = json.loads((bs_dir / "modelpress.json").read_text())
        lo, hi = size_range_mb(manifest)
        sizes = sorted(set([float(x) for x in np.linspace(lo, hi, 10)] + [target]))
        for mb in sizes:
            key = f"bitstack|{mb:.3f}"
            if cache.get(key):
                continue
            print("==", key, flush=True)
            m, _, info = load_bitstack(bs_dir, mb, device=args.device)
            r = evaluate(m, windows.eval, reference=ref())
            cache.put(key, {"label": f"BitStack @ {mb:.1f} MB", "ppl": r.ppl, "kl": r.kl, "size_mb": info["size_mb"],
                            "blocks": info["blocks"], "at_target": abs(mb - target) < 1e-9})
            del m
            gc.collect()

    if args.only in (None, "joint") and not cache.get("joint"):
        model = copy.deepcopy(base)
        t = time.time()
        db = open_database(model, tok, "joint", data=windows, **JOINT)
        build = time.time() - t
        print("== joint search", flush=True)
        res = allocate(model, db, Budget("mb", target), "evolutionary", data=windows,
                       settings=SearchSettings(fitness_windows=32), generations=args.generations, offspring=16,
                       tokens=(512, 2048), survivors=(2, 1),
                       checkpoint=str(db.path / "searches" / f"bench-mb-{target:.3f}.json"))
        c = materialize(model, tok, db, res.plan)
        with tempfile.TemporaryDirectory() as tmp:
            c.save(Path(tmp) / "ck")
            size = mp.info(Path(tmp) / "ck")["weights_mb"]
        r = evaluate(model, windows.eval, reference=ref())
        kinds = {}
        for v in res.plan.levels.values():
            kinds[v] = kinds.get(v, 0) + 1
        cache.put("joint", {"label": "joint search (bits x sparsity x EoRA rank)", "ppl": r.ppl, "kl": r.kl,
                            "size_mb": size, "seconds": res.seconds["search"], "build_s": build,
                            "levels_used": kinds, "generations": len(res.history)})
        del model
        gc.collect()
    render(cache, target)


def render(cache: RowCache, target: float) -> None:
    from modelpress.plots import plot_curve

    dense = cache.get("dense")
    rows = []
    for key, r in cache.rows.items():
        if "label" not in r or (key.startswith("bitstack|") and not r.get("at_target")):
            continue
        rows.append(dict(r, ppl_ratio=r["ppl"] / dense["ppl"] if dense else None))
    md = print_table(rows, COLUMNS)
    bs = sorted((r for k, r in cache.rows.items() if k.startswith("bitstack|") and "ppl" in r), key=lambda r: r["size_mb"])
    search = RowCache("search")
    uniform = RowCache("uniform")
    points = {}
    for bits in (2, 3, 4):
        u = uniform.get(f"gptq w{bits} g64")
        if u:
            points[f"uniform GPTQ {bits}-bit (88 windows)"] = (u["size_mb"], u["ppl"])
    for b in ("2.5", "3", "4"):
        for alloc in ("uniform", "evolutionary"):
            r = search.get(f"quant|{b} bits/weight|{alloc}")
            if r:
                points[f"{alloc} {b} bits"] = (r["size_mb"], r["ppl"])
    j = cache.get("joint")
    if j:
        points["joint search"] = (j["size_mb"], j["ppl"])
    if bs:
        plot_curve(DOCS.parent / "size_ppl.png", {"BitStack (one checkpoint, any size)": (
            [r["size_mb"] for r in bs], [r["ppl"] for r in bs])}, "size on disk / in memory (MB)",
            "held-out pydoc perplexity", points=points, logy=True)
    body = (
        "## Low-rank, EoRA, BitStack and joint search (`bench/lowrank.py`)\n\n"
        f"smollm2-135m; calibration 128 x 512 tokens, evaluation on the first {N_EVAL} held-out windows "
        f"(as in the search table). Target size: uniform GPTQ 3-bit g64 = {target:.2f} MB. EoRA rows add their "
        "factors (float16) on top, so they are larger than the operator alone. BitStack is one checkpoint "
        "loaded at the target size. Joint search: evolutionary over GPTQ {2,3,4} bits x SparseGPT {0,50%} x "
        "EoRA rank {0,16}, Pareto-pruned per layer, under the same total MB. "
        f"Machine: {(cache.get('machine') or {}).get('text') or machine()}.\n\n" + md + "\n\n![size vs perplexity](size_ppl.png)\n"
    )
    write_section("lowrank", body)


if __name__ == "__main__":
    main()
