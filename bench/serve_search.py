"""The price of serving constraints: `--serve vllm` (q/k/v and gate/up tied, 4/8-bit symmetric
levels) against the same search untied, on smollm2-135m.

One level database per setting (GPTQ 4 and 8 bits, g64, symmetric, static groups, every level on
the 4-bit model's inputs), then uniform, dp and the evolutionary search (CPU preset size) at each
budget, evaluated on every domain. At 4.0 bits/weight the only plan is all 4-bit, so the table
starts above it. Rows: bench/results/serve.json.

    python bench/serve_search.py [--force] [--render] [--generations 12]
"""
from __future__ import annotations

import argparse
import json
import time

from common import RowCache, machine, not_run_note, print_table, write_section

import modelpress as mp
from modelpress.allocate.budget import Budget
from modelpress.data.suites import SUITES, suite_windows
from modelpress.eval.suite import SuiteReference, evaluate_suite, suite_row
from modelpress.levels import PlanState
from modelpress.presets import PRESETS
from modelpress.search import SearchSettings, allocate, open_database
from modelpress.utils.device import compute_dtype

BUDGETS = (4.5,)
SETTINGS = {"untied": {}, "serve vllm": {"serve": "vllm"}}
LEVELS = dict(levels=(4, 8), group_size=64, sym=True, static_groups=True, sequential_level=4)
ALLOCATORS = ("uniform", "dp", "evolutionary")


def key(setting: str, bits: float, alloc: str) -> str:
    return f"{setting} | {bits:g} | {alloc}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--render", action="store_true")
    ap.add_argument("--generations", type=int, default=PRESETS["cpu"]["search"]["generations"])
    ap.add_argument("--n-eval", type=int, default=8)
    args = ap.parse_args()
    cache = RowCache("serve", force=args.force)
    if not args.render:
        with compute_dtype("float32"):
            run(cache, args)
    render(cache.everything(), args.generations)


def run(cache: RowCache, args) -> None:
    todo = [(s, b, a) for s in SETTINGS for b in BUDGETS for a in ALLOCATORS if not cache.get(key(s, b, a))]
    if not todo:
        return
    model, tok = mp.load_model("smollm2-135m", device="cpu")
    domains = suite_windows(tok, SUITES["default"], seq_len=512, n_eval=args.n_eval)
    ref = SuiteReference(model, domains)
    cache.put("dense", {**suite_row(ref.dense), "domains": domains.names})
    windows = mp.get_windows(tok, mp.DataConfig(n_samples=PRESETS["cpu"]["n_samples"], seq_len=512), model=model)
    fitness = SearchSettings(fitness_windows=PRESETS["cpu"]["fitness_windows"],
                             validation_windows=PRESETS["cpu"]["validation_windows"])
    for setting, extra in SETTINGS.items():
        if not any(s == setting for s, _, _ in todo):
            continue
        t = time.time()
        db = open_database(model, tok, "quant", data=windows, **LEVELS, **extra)
        build_s = time.time() - t
        state = PlanState(model, db)
        reference = None
        for bits in BUDGETS:
            for alloc in ALLOCATORS:
                k = key(setting, bits, alloc)
                if cache.get(k):
                    continue
                print(f"== {k}", flush=True)
                kw = ({**PRESETS["cpu"]["search"], "generations": args.generations}
                      if alloc == "evolutionary" else {})
                res = allocate(model, db, Budget("bits", bits), alloc, data=windows, settings=fitness, state=state,
                               reference=reference, **kw)
                reference = res.reference or reference
                state.apply(res.plan.levels)
                row = {"setting": setting, "bits": bits, "allocator": alloc, "units": len(res.problem.units),
                       **suite_row(evaluate_suite(model, domains, ref), ref.dense),
                       "search_s": res.seconds.get("search"), "db_build_s": build_s,
                       "cost": res.plan.info["cost"], "budget_cost": res.plan.info["budget_cost"]}
                state.restore()
                cache.put(k, row)
                print(json.dumps(row), flush=True)


def render(cache: RowCache, generations: int) -> None:
    dense = cache.get("dense")
    domains = dense["domains"] if dense else list(SUITES["default"])
    table = [cache.get(key(s, b, a)) for b in BUDGETS for s in SETTINGS for a in ALLOCATORS
             if cache.get(key(s, b, a))]
    for r in table:
        r["label"] = f"{r['bits']:g} bits, {r['setting']}, {r['allocator']}"
    cols = [("label", "plan"), ("units", "search units")] + [(f"ppl:{d}", f"ppl {d}") for d in domains] + [
        ("worst_ratio", "worst × dense"), ("kl", "KL to dense"), ("search_s", "search s")]
    md = print_table(table, cols)
    missing = [key(s, b, a) for s in SETTINGS for b in BUDGETS for a in ALLOCATORS if not cache.get(key(s, b, a))]
    body = ("## The price of `--serve vllm` (`bench/serve_search.py`)\n\n"
            "smollm2-135m, levels GPTQ 4 and 8 bits g64 symmetric with static groups (what vLLM runs on Marlin / "
            "Machete), every level on the 4-bit model's inputs, "
            f"{PRESETS['cpu']['n_samples']} x 512 calibration tokens of mix+self; `serve vllm` ties each block's "
            "q/k/v and gate/up into one search unit (120 units instead of 210 on smollm2), `untied` lets every layer choose. "
            f"Evolutionary: the CPU preset ({generations} generations). Evaluation: held-out windows of each domain "
            "(float32 compute). At 4.0 bits/weight the only plan is all 4-bit. "
            + not_run_note(missing, "serve_search.py") + f"Machine: {machine()}.\n\n" + md)
    write_section("serve", body)


if __name__ == "__main__":
    main()
