"""Budget-optimal compression of smollm2-135m with the current defaults: the evolutionary search
against the model-free allocators over the same level database, on every evaluation domain.

Each budget is one `modelpress.search` run with the `cpu` preset (modelpress.presets, what
`modelpress compress --target-bits` and `make demo` run): 128 x 512 calibration tokens of the
default source, evolutionary search with the preset's generations, offspring and fitness windows
(held out from the database's calibration windows), evaluation on the default suite. Levels:
`quant` = GPTQ 2/3/4 bits g64, all calibrated on the inputs of the level nearest the budget;
`sparsity` = SparseGPT (with its refit) in equal absolute steps, on the dense model's inputs
(`--sparsity-levels` of them on the largest layers); `depth` = dropping attention / MLP sub-blocks.
Rows are cached (bench/results/search.json) and run in the order of RUNS; databases and search
checkpoints live in the modelpress cache, so an interrupted run resumes.

    python bench/search.py [--only "sparsity 0.5"] [--force] [--render] [--sparsity-levels 10]
"""
from __future__ import annotations

import copy
import dataclasses
import gc
import json
import tempfile
import time

from common import RowCache, bench_args, machine, not_run_note, print_table, write_section

import modelpress as mp
from modelpress.allocate.budget import Budget
from modelpress.presets import PRESETS, budget_config, preset_search
from modelpress.search import SearchConfig, search

# run key -> (budget, model-free allocators run beside the search); most informative first
RUNS = {
    "quant 3": (Budget("bits", 3.0), ("uniform", "dp")),
    "quant 3.5": (Budget("bits", 3.5), ("uniform", "dp")),  # 4.0 is the top level of the cpu preset: no choice
    "sparsity 0.5": (Budget("sparsity", 0.5), ("uniform", "owl")),
    "depth 4": (Budget("drop", 4), ("block-influence",)),
    "quant 2.5": (Budget("bits", 2.5), ("uniform", "dp")),
    "sparsity 0.6": (Budget("sparsity", 0.6), ("uniform", "owl")),
    "depth 8": (Budget("drop", 8), ("block-influence",)),
}


def config(budget: Budget, compare: tuple[str, ...], out: str, n_eval: int, sparsity_levels: int) -> SearchConfig:
    if budget.kind == "drop":  # budget_config makes quant / sparsity searches: the preset's search over depth
        return SearchConfig(budget=budget, kind="depth", compare=compare, out=out, n_eval=n_eval,
                            **preset_search("cpu"))
    levels = {"max_levels": sparsity_levels} if budget.kind == "sparsity" else None
    cfg = budget_config(budget, machine="cpu", out=out, n_eval=n_eval, level_settings=levels)
    return dataclasses.replace(cfg, compare=compare)


def main() -> None:
    args = bench_args(__doc__, extra=lambda ap: ap.add_argument("--sparsity-levels", type=int, default=10))
    cache = RowCache("search", force=args.force)
    todo = [k for k in RUNS if (not args.only or args.only in k) and not cache.get(k)]
    if todo and not args.render:
        model, tok = mp.load_model("smollm2-135m", device="cpu")
        for key in todo:
            budget, compare = RUNS[key]
            print(f"== {key}", flush=True)
            t = time.time()
            with tempfile.TemporaryDirectory() as out:
                # search() leaves its chosen plan in the model it is given: each run gets a dense copy
                report = search(copy.deepcopy(model), tok,
                                config(budget, compare, out, args.n_eval, args.sparsity_levels),
                                model_name="smollm2-135m")
            fit = report.get("fitness") or {}
            cache.put(key, {"budget": budget.label(), "rows": report["rows"], "columns": report["columns"],
                            "database_s": report["database"]["build_seconds"], "wall_s": time.time() - t,
                            "data": report["data"], "method": report["method"], "evaluation": report["evaluation"],
                            "generations": len(report["history"]),
                            "validation": [fit.get("start_validation"), fit.get("final_validation")],
                            "selected_generation": fit.get("selected_generation"),
                            "sparsity_levels": args.sparsity_levels if budget.kind == "sparsity" else None,
                            "machine": machine()})
            print(json.dumps({k: v for k, v in cache.get(key).items() if k != "rows"}, default=str), flush=True)
            gc.collect()
    render(cache.everything())


def render(cache: RowCache) -> None:
    done = [k for k in RUNS if cache.get(k)]
    parts = []
    for key in done:
        r = cache.get(key)
        evo = next((row for row in r["rows"] if row["label"] == "evolutionary"), {})
        beats = evo.get("beats_uniform_on_every_domain")
        start, final = r.get("validation") or (None, None)
        seq = r["method"].get("sequential_level")
        note = [f"database {r['database_s']:.0f} s" if r["database_s"] >= 10 else
                "database read from the modelpress cache (built by an earlier run with the same settings)",
                f"levels on the {seq}-bit model's inputs" if seq else None,
                f"{r['sparsity_levels']} levels on the largest layers" if r.get("sparsity_levels") else None,
                f"{r['generations']} generations",
                f"validation KL {start:.4f} → {final:.4f} (generation {r['selected_generation']})"
                if final is not None else None,
                {True: "the search beats uniform on every domain", False: "the search does **not** beat uniform "
                 "on every domain"}.get(beats)]
        cols = [tuple(c) for c in r["columns"]]
        parts.append(f"### {r['budget']}\n\n" + "; ".join(n for n in note if n) + ".\n\n"
                     + print_table(r["rows"], cols))
    first = cache.get(done[0]) if done else None
    missing = [k for k in RUNS if not cache.get(k)]
    ev = first["evaluation"] if first else None
    body = ("## Budget-optimal search (`bench/search.py`)\n\n"
            "smollm2-135m, the `cpu` preset of `modelpress.presets` (what `compress --target-bits` and `make demo` "
            "run): "
            + (f"{first['data']['n_samples']} x {first['data']['seq_len']} calibration tokens of "
               f"`{first['data']['corpus']}` for the levels; " if first else "")
            + f"evolutionary search, {PRESETS['cpu']['search']['generations']} generations x "
            f"{PRESETS['cpu']['search']['offspring']} offspring on {'/'.join(map(str, PRESETS['cpu']['search']['tokens']))} "
            f"tokens per selection stage, fitness = KL to dense on {PRESETS['cpu']['fitness_windows']} windows of the "
            "calibration source held out from the levels' windows, the plan with the lowest validation KL "
            f"({PRESETS['cpu']['validation_windows']} more windows) returned; the other allocators run over the same "
            "database. Quantization levels: GPTQ 2/3/4 bits g64 (act-order, clipping search, shrink 0.1), all "
            "calibrated on the inputs of the model at the level nearest the budget; `uniform` at a non-integer "
            "target mixes the two neighbouring levels. Sparsity levels: SparseGPT with its refit, in equal absolute "
            "steps (the same number of weights per step in every layer, so the budget stays exact), on the dense "
            "model's inputs, so its `uniform` row is not the uniform table's sequential SparseGPT; `owl` = "
            "outlier-weighted layerwise sparsity. Depth: attention and MLP sub-blocks (60), `block-influence` drops "
            "the least influential. "
            + (f"Evaluation: {', '.join(ev['domains'])}, {max(ev['windows_per_domain'].values())} held-out windows "
               "each; worst = the largest perplexity ratio to dense. " if ev else "")
            + "search s = the allocator's own time (the database excluded). "
            + not_run_note(missing, "search.py")
            + f"Machine: {first['machine'] if first else machine()}.\n\n" + "\n\n".join(parts))
    write_section("search", body)


if __name__ == "__main__":
    main()
