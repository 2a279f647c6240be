"""Low-rank, EoRA, BitStack and joint search on smollm2-135m, on every evaluation domain. Writes a
table and a size–quality plot (docs/size_ppl.png) into docs/.

Everything is compared at the total size of uniform GPTQ 3-bit g64. Calibration: 128 x 512 tokens
of the default source (mix+self); evaluation: 16 held-out windows of each domain of the default
suite (pydoc, austen, chitchat), as bench/search.py, whose uniform / evolutionary plans at 2.5,
3 and 3.5 bits become points on the plot.

    python bench/lowrank.py [--only eora|bitstack|joint] [--methods gptq] [--cache NAME] [--device cuda] [--force]
    python bench/lowrank.py --render     # tables and plot from the row caches only

Rows are cached per machine (`--cache`; "lowrank" = this machine, "lowrank-h100" = a GPU run): the
pydoc domain is CPython's own manual, so another Python version evaluates on other text.
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

from common import DOCS, SCRATCH, RowCache, machine, print_table, write_section

import modelpress as mp
from modelpress.allocate.budget import Budget
from modelpress.data.suites import SUITES, suite_windows
from modelpress.eval.suite import SuiteReference, evaluate_suite, suite_row
from modelpress.export.bitstack import BitStackConfig, build_bitstack, load_bitstack, size_range_mb
from modelpress.presets import preset_search
from modelpress.search import allocate, materialize, open_database
from modelpress.utils.device import active_compute_dtype

N_EVAL = 16
# GPTQ with its default clipping search (the search table's levels are built the same way)
EORA = [("gptq", dict(bits=3, group_size=64)), ("sparsegpt", dict(sparsity=0.5)), ("wanda", dict(pattern="2:4")),
        ("rtn", dict(bits=3, group_size=64))]
JOINT = dict(bits=(2, 3, 4), sparsity=(0.0, 0.5), ranks=(0, 16, 32), group_size=64, sequential_level="w3")
CACHES = {"lowrank": "this machine", "lowrank-h100": "GPU run"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default=None)
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the machine line names the GPU)")
    ap.add_argument("--methods", default=None, help="EoRA section: only these operators, e.g. gptq,rtn")
    ap.add_argument("--eora-ranks", default="16,32", help="EoRA ranks added to GPTQ 3-bit (others get 16)")
    ap.add_argument("--cache", default="lowrank", help="row cache name (one per machine, see above)")
    ap.add_argument("--render", action="store_true", help="only re-render the tables and plot from the row caches")
    args = ap.parse_args()
    cache = RowCache(args.cache, force=args.force)
    if args.render:
        render()
        return
    base, tok = mp.load_model("smollm2-135m", device=args.device)
    cache.put("machine", {"text": machine()})  # where the rows were measured (a later --render may run elsewhere)
    preset = preset_search("cpu")
    data = preset["data"]  # the default source at the cpu preset's 128 x 512 tokens
    windows = mp.get_windows(tok, data, model=base)
    domains = suite_windows(tok, SUITES["default"], seq_len=512, n_eval=N_EVAL)
    state = {"ref": None}

    def ref() -> SuiteReference:
        if state["ref"] is None:
            state["ref"] = SuiteReference(base, domains)
            if not cache.get("dense"):
                cache.put("dense", {"label": "dense", **suite_row(state["ref"].dense), "domains": domains.names,
                                    "size_mb": sum(p.numel() for p in base.parameters()) * 2 / 1e6,
                                    "data": data.corpus, "calib_windows": data.n_samples,
                                    "compute_dtype": str(active_compute_dtype(args.device)).removeprefix("torch.")})
        return state["ref"]

    def scored(model) -> dict:
        return suite_row(evaluate_suite(model, domains, ref()), ref().dense)

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
        cache.put(label, {"label": label, **scored(model), "size_mb": size, "seconds": secs})
        del model
        gc.collect()

    if args.only in (None, "eora"):
        for method, kw in EORA:
            if args.methods and method not in args.methods.split(","):
                continue
            name = f"{method} " + (f"w{kw['bits']} g64" if "bits" in kw else kw.get("pattern") or f"{int(100 * kw['sparsity'])}%")
            run_compress(name, method, kw)
            ranks = [int(r) for r in args.eora_ranks.split(",")] if (method, kw.get("bits")) == ("gptq", 3) else [16]
            for r in ranks:
                run_compress(f"{name} + EoRA r{r}", method, kw, comp="eora", rank=r)
    target = (cache.get("gptq w3 g64") or {}).get("size_mb")
    if target is None:
        run_compress("gptq w3 g64", *EORA[0])  # the target size
        target = cache.get("gptq w3 g64")["size_mb"]

    bs_dir = SCRATCH / f"bitstack-smollm2-{data.corpus}"
    if args.only in (None, "bitstack", "plot"):
        if not (bs_dir / "modelpress.json").is_file():
            t = time.time()
            build_bitstack(copy.deepcopy(base), tok, windows, bs_dir, BitStackConfig(max_blocks=8, rank=4))
            cache.put("bitstack|build", {"seconds": time.time() - t})
        manifest = json.loads((bs_dir / "modelpress.json").read_text())
        lo, hi = size_range_mb(manifest)
        for mb in sorted(set([float(x) for x in np.linspace(lo, hi, 10)] + [target])):
            key = f"bitstack|{mb:.3f}"
            if cache.get(key):
                continue
            print("==", key, flush=True)
            m, _, info = load_bitstack(bs_dir, mb, device=args.device)
            cache.put(key, {"label": f"BitStack @ {mb:.1f} MB", **scored(m), "size_mb": info["size_mb"],
                            "blocks": info["blocks"], "at_target": abs(mb - target) < 1e-9})
            del m
            gc.collect()

    if args.only in (None, "joint") and not cache.get("joint"):
        model = copy.deepcopy(base)
        t = time.time()
        db = open_database(model, tok, "joint", data=windows, **JOINT)
        build = db.meta.get("build_seconds", time.time() - t)  # a cached database: the run that built it
        print("== joint search", flush=True)
        # the cpu preset's search; fitness and validation on windows of the source held out from the levels'
        res = allocate(model, db, Budget("mb", target), "evolutionary", data=data, tokenizer=tok,
                       settings=preset["fitness"], **preset["allocator_settings"],
                       checkpoint=str(db.path / "searches" / f"bench-mb-{target:.3f}.json"))
        c = materialize(model, tok, db, res.plan)
        with tempfile.TemporaryDirectory() as tmp:
            c.save(Path(tmp) / "ck")
            size = mp.info(Path(tmp) / "ck")["weights_mb"]
        kinds = {}
        for v in res.plan.levels.values():
            kinds[v] = kinds.get(v, 0) + 1
        cache.put("joint", {"label": "joint search (bits x sparsity x EoRA rank), levels on w3 inputs", **scored(model),
                            "size_mb": size, "seconds": res.seconds["search"], "build_s": build,
                            "levels_used": kinds, "generations": len(res.history),
                            "offspring": preset["allocator_settings"]["offspring"]})
        del model
        gc.collect()
    render()


def columns(domains: list[str]) -> list[tuple[str, str]]:
    return ([("label", "method")] + [(f"ppl:{d}", f"ppl {d}") for d in domains]
            + [("worst_ratio", "worst × dense"), ("worst_domain", "worst domain"), ("kl", "KL to dense"),
               ("size_mb", "size MB"), ("seconds", "time s")])


def table(cache: RowCache) -> str:
    dense = cache.get("dense") or {}
    domains = dense.get("domains", list(SUITES["default"]))
    rows = [r for key, r in cache.rows.items()
            if "label" in r and not (key.startswith("bitstack|") and not r.get("at_target"))]
    target = (cache.get("gptq w3 g64") or {}).get("size_mb")
    head = (f"Machine: {(cache.get('machine') or {}).get('text', '?')}; "
            f"{dense.get('compute_dtype', '?')} forwards. Target size (uniform GPTQ 3-bit g64): ")
    head += f"{target:.2f} MB." if target else "not measured."
    j = cache.get("joint")
    if j:
        head += (f" Joint search: {j['generations']} generations x {j['offspring']} offspring, database "
                 f"{j['build_s']:.0f} s, search {j['seconds']:.0f} s; levels used: "
                 + ", ".join(f"{k} x{n}" for k, n in sorted(j["levels_used"].items())) + ".")
    else:
        head += " Joint search: not run in this cache."
    md = print_table(rows, columns(domains))
    g = cache.get("gptq w3 g64")
    if g and j:
        others = [r for k, r in cache.rows.items() if "label" in r and r.get("size_mb", 1e9) <= g["size_mb"] + 1e-6
                  and k not in ("joint", "dense")]
        best = min(others, key=lambda r: r["worst_ratio"])
        if j["worst_ratio"] < best["worst_ratio"]:
            md += (f"\n\nAt the target size the joint search is the best row by worst ratio: {j['worst_ratio']:.3f} "
                   f"vs {best['worst_ratio']:.3f} ({best['label']}).")
        else:
            md += (f"\n\nAt the target size the joint search ({j['worst_ratio']:.3f}) is not the best row by worst "
                   f"ratio: {best['label']} ({best['worst_ratio']:.3f}) is.")
    bs = cache.get("bitstack|build")
    if bs:
        md += f"\n\nBitStack decomposition (build) took {bs['seconds']:.0f} s; each size is a prefix of it, loaded without recompressing."
    return head + "\n\n" + md


def search_points() -> dict[str, tuple[float, float]]:
    """(size MB, worst ratio) of the uniform and evolutionary quantization plans of the search table
    (bench/results/search.json), measured on the same domains and windows."""
    points = {}
    for key, run in RowCache("search").rows.items():
        if key.startswith("quant "):
            for r in run.get("rows", []):
                if r.get("label") in ("uniform", "evolutionary"):
                    points[f"{r['label']} {key.split()[1]} bits"] = (r["size_mb"], r["worst_ratio"])
    return points


def render() -> None:
    from modelpress.plots import plot_curve

    caches = {name: c for name, c in ((n, RowCache(n)) for n in CACHES) if c.rows}
    parts = [f"### `{name}` ({CACHES[name]})\n\n" + table(cache) for name, cache in caches.items()]
    # the plot: BitStack's curve with every single-size point measured on the same text
    curve_cache = next((c for c in caches.values() if any(k.startswith("bitstack|") for k in c.rows)), None)
    plot_note = ""
    if curve_cache is not None:
        bs = sorted((r for k, r in curve_cache.rows.items() if k.startswith("bitstack|") and "worst_ratio" in r),
                    key=lambda r: r["size_mb"])
        points = {r["label"]: (r["size_mb"], r["worst_ratio"]) for k, r in curve_cache.rows.items()
                  if "label" in r and not k.startswith("bitstack|") and k != "dense"}
        same_text = curve_cache is caches.get("lowrank")
        if same_text:  # the search table ran on this machine's text: its plans go on the same axes
            points.update(search_points())
        plot_curve(DOCS.parent / "size_ppl.png", {"BitStack (one checkpoint, any size)": (
            [r["size_mb"] for r in bs], [r["worst_ratio"] for r in bs])}, "size on disk / in memory (MB)",
            "worst perplexity ratio to dense (pydoc, austen, chitchat)", points=points, logy=True,
            ymax=10 * max(y for _, y in points.values()) if points else None)
        plot_note = ("\n\n![size vs worst ratio](size_ppl.png)\n\nThe curve and its points come from the same "
                     "evaluation windows" + (", the search table's plans included" if same_text else
                                             " (GPU run; the search table's plans were measured on this machine's "
                                             "text, so they are in that table, not on this plot)") + ".")
    body = (
        "## Low-rank, EoRA, BitStack and joint search (`bench/lowrank.py`)\n\n"
        f"smollm2-135m; calibration 128 x 512 tokens of the default source (mix+self), evaluation on {N_EVAL} "
        "held-out windows of each domain (pydoc, austen, chitchat); worst = the largest perplexity ratio to dense. "
        "GPTQ (rows and joint levels) with its defaults, as in the search table. "
        "EoRA rows add their factors (float16) on top, so they are larger than the operator alone. BitStack is "
        "one checkpoint (8 blocks of rank 4 per layer) loaded at the target size. Joint search: evolutionary (the "
        "cpu preset's generations, offspring and held-out fitness windows) over GPTQ {2,3,4} bits x SparseGPT "
        "{0,50%} x EoRA rank {0,16,32}, Pareto-pruned per layer, under the target MB, every level computed from the "
        "inputs of the model compressed at w3 (`--sequential-level w3`). "
        "`pydoc` is the manual of the Python that runs the benchmark, so a machine with another Python version "
        "evaluates on other text: compare rows within one table (each has its own dense row).\n\n"
        + "\n\n".join(parts) + plot_note
    )
    write_section("lowrank", body)


if __name__ == "__main__":
    main()
