"""Budget-optimal compression of smollm2-135m: uniform vs dp/owl/block-influence vs evolutionary.

Same calibration (128 x 512 tokens of pydoc) for the databases and the fitness, same held-out
evaluation (88 x 512 tokens) as bench/uniform.py. Rows are cached (bench/results/search.json),
so an interrupted run resumes; level databases live in the modelpress cache and resume too.

    python bench/search.py [--only quant|sparsity|depth|speed] [--generations 30] [--force] [--extend quant:3:60]
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import re
import time

import numpy as np

from common import DOCS, RowCache, machine, not_run_note, print_table, published_rows, same_machine, write_section

import modelpress as mp
from modelpress.allocate.budget import Budget, make_problem
from modelpress.allocate.evolutionary import mutate, sensitivity_cache
from modelpress.eval import ReferenceLogprobs, evaluate
from modelpress.eval.fitness import KLFitness
from modelpress.levels import PlanState
from modelpress.search import SearchSettings, allocate, open_database

log = logging.getLogger(__name__)

SECTIONS = {
    "quant": dict(kind="quant", settings=dict(levels=(2, 3, 4, 5, 6), group_size=64, mse=True),
                  budgets=[Budget("bits", b) for b in (2.5, 3.0, 4.0)], allocators=["uniform", "dp", "evolutionary"]),
    "sparsity": dict(kind="sparsity", settings=dict(max_sparsity=0.9, max_levels=24, refit_iters=0),
                     budgets=[Budget("sparsity", s) for s in (0.5, 0.6, 0.7)],
                     allocators=["uniform", "owl", "evolutionary"]),
    "depth": dict(kind="depth", settings={}, budgets=[Budget("drop", n) for n in (4, 8)],
                  allocators=["block-influence", "evolutionary"]),
}
N_EVAL = 40  # held-out windows (20k tokens): the first 40 of the 88 used by bench/uniform.py
COLUMNS = [("budget", "budget"), ("allocator", "allocator"), ("ppl", "ppl"), ("ppl_ratio", "× dense"),
           ("kl", "KL to dense"), ("size_mb", "size MB"), ("search_s", "search s"), ("generations", "gens")]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default=None)
    ap.add_argument("--generations", type=int, default=20)
    ap.add_argument("--offspring", type=int, default=12)
    ap.add_argument("--tokens", default="512,1536", help="fitness tokens per selection stage")
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--extend", default=None, metavar="SECTION:BUDGET:GENERATIONS",
                    help="continue one finished evolutionary search to more generations, e.g. quant:3:60 "
                         "(an extra row; the original row stays)")
    ap.add_argument("--sensitivity-tokens", type=int, default=2048)
    ap.add_argument("--init", default=None, choices=["sensitivity"],
                    help="with --extend: a new search started from the measured-sensitivity plan (rows for "
                         "the sensitivity allocator and for the search)")
    ap.add_argument("--sequential-level", type=int, default=None, metavar="BITS",
                    help="with --extend quant:...: run the rows on a database whose levels are all computed on the "
                         "inputs of the BITS-bit model (adds its own uniform and dp rows)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cache = RowCache("search", force=args.force)
    if not cache.rows:
        adopt_published(cache)
    model, tok = mp.load_model("smollm2-135m", device="cpu")
    windows = mp.get_windows(tok, mp.DataConfig(n_samples=128, seq_len=512, n_eval=N_EVAL))
    tokens = tuple(int(t) for t in args.tokens.split(","))
    evo = dict(generations=args.generations, offspring=args.offspring, tokens=tokens, survivors=(2, 1))
    ref = None
    extend = None
    if args.extend:
        sec, value, gens = args.extend.split(":")
        extend = (sec, float(value), int(gens))
        args.only = sec
    todo = [s for s in SECTIONS if not args.only or args.only == s]
    for sec in todo:
        spec = SECTIONS[sec]
        jobs = [(b, a, f"{sec}|{b.label()}|{a}", evo) for b in spec["budgets"] for a in spec["allocators"]]
        settings, suffix = dict(spec["settings"]), ""
        if extend:
            b = next(b for b in spec["budgets"] if b.value == extend[1])
            if args.sequential_level is not None:
                settings["sequential_level"] = args.sequential_level
                suffix = shared_inputs_suffix(args.sequential_level)
            if args.init:
                ev = dict(evo, generations=extend[2], init=args.init, sensitivity_tokens=args.sensitivity_tokens)
                jobs = [(b, "sensitivity", f"{sec}|{b.label()}|sensitivity, {ev['sensitivity_tokens']} tokens{suffix}",
                         dict(tokens=ev["sensitivity_tokens"])),
                        (b, "evolutionary", f"{sec}|{b.label()}|evolutionary, {extend[2]} generations, "
                                            f"{'/'.join(map(str, tokens))} tokens, sensitivity start{suffix}", ev)]
            else:
                jobs = [(b, "evolutionary", f"{sec}|{b.label()}|evolutionary, {extend[2]} generations{suffix}",
                         dict(evo, generations=extend[2]))]
            if suffix:  # a database of its own: its own baselines
                jobs = [(b, a, f"{sec}|{b.label()}|{a}{suffix}", evo) for a in ("uniform", "dp")] + jobs
        db_key = f"{sec}|db{suffix}"
        if all(cache.get(k) for _, _, k, _ in jobs) and cache.get(db_key):
            continue
        t = time.time()
        db = open_database(model, tok, spec["kind"], data=windows, **settings)
        built_now = time.time() - t
        if not cache.get(db_key):
            cache.put(db_key, {"build_s": db.meta.get("build_seconds", built_now), "path": str(db.path)})
        if ref is None:
            ref = ReferenceLogprobs(model, windows.eval)
            d = evaluate(model, windows.eval, reference=ref)
            cache.put("dense", {"ppl": d.ppl, "kl": 0.0})
        settings = SearchSettings(fitness_windows=32)
        state = PlanState(model, db)
        fit_ref = None  # the fitness's dense top-K, computed once per database
        if extend and not suffix:
            b = jobs[0][0]
            if not checkpoint(db, b, args.init).is_file():
                jobs.insert(0, (b, "uniform", f"{sec}|{b.label()}|uniform, database of the {extend[2]}-generation row",
                                evo))
        for b, a, key, evo_kw in jobs:
            if cache.get(key):
                continue
            print(f"== {key}", flush=True)
            kw = dict(evo_kw, checkpoint=str(checkpoint(db, b, evo_kw.get("init")))) if a == "evolutionary" else {}
            if a == "sensitivity":  # its measurements are the ones the search's start reads back
                kw = dict(evo_kw, cache=str(sensitivity_cache(checkpoint(db, b, "sensitivity"))))
            res = allocate(model, db, b, a, data=windows, settings=settings, state=state, reference=fit_ref, **kw)
            fit_ref = res.reference or fit_ref
            state.apply(res.plan.levels)
            r = evaluate(model, windows.eval, reference=ref)
            size = (db.meta["fixed_bytes"] + sum(int(db.level_meta(u, v)["nbytes"])
                                                 for u, v in res.plan.levels.items())) / 1e6
            row = {"section": sec, "budget": b.label(), "allocator": key.split("|")[2], "ppl": r.ppl, "kl": r.kl,
                   "size_mb": size, "search_s": res.seconds.get("search"), "reference_s": res.seconds.get("reference"),
                   "generations": len(res.history) or None, "fitness": res.fitness_stats,
                   "evo": evo_kw if a in ("evolutionary", "sensitivity") else None, "from_checkpoint": res.resumed_at > 0,
                   "db_build_s": db.meta.get("build_seconds"),  # recorded by the run that built it
                   "cost": res.plan.info["cost"], "budget_cost": res.plan.info["budget_cost"],
                   "levels": res.plan.levels}
            cache.put(key, row)
            print(json.dumps({k: v for k, v in row.items() if k != "levels"}), flush=True)
        state.restore()
        del state
        gc.collect()
    if (not args.only or args.only == "speed") and not cache.get("speed"):
        cache.put("speed", measure_speedup(model, tok, windows))
    render(cache.everything())


def shared_inputs_suffix(bits: int) -> str:
    """What names the rows of a database built with `sequential_level=bits`."""
    return f", levels on {bits}-bit inputs"


def suffix_of(key: str) -> str:
    """The `shared_inputs_suffix` a row key ends in ("" for rows of a per-level database)."""
    m = re.search(r", levels on \d+-bit inputs$", key)
    return m.group(0) if m else ""


def own_uniform(cache: RowCache, key: str, extended: list[str]) -> dict | None:
    """The uniform row of the database `key` ran on: rows of a `--sequential-level` database end in its
    suffix and so does their uniform; other `--extend` rows ran on the rebuilt database whose uniform is
    the `uniform, database of the ...` row; the rest on the published one."""
    sec, budget, name = key.split("|")
    if suffix_of(name):
        return cache.get(f"{sec}|{budget}|uniform{suffix_of(name)}")
    if name in ("evolutionary", "uniform", "dp"):
        return cache.get(f"{sec}|{budget}|uniform")
    rebuilt = [k for k in extended if k.startswith(f"{sec}|{budget}|uniform, database of ")]
    return cache.get(rebuilt[0]) if rebuilt else None


def checkpoint(db, budget: Budget, init: str | None = None):
    """Where the evolutionary search of `budget` on `db` checkpoints (one file per kind of start)."""
    return db.path / "searches" / f"bench-{budget.kind}-{budget.value:g}{'-' + init if init else ''}.json"


def adopt_published(cache: RowCache) -> None:
    """A new checkout has no row cache (it is not in git). Where docs/benchmarks.md was measured on
    this kind of machine, its rows are taken as finished, so a partial re-run (`--only`, `--extend`)
    adds to the published table instead of replacing it with the few rows it measured."""
    if not same_machine("search"):
        return
    text = DOCS.read_text()
    dense = re.search(r"Dense perplexity: (\d+\.\d+)", text)
    if dense:
        cache.put("dense", {"ppl": float(dense.group(1)), "kl": 0.0, "published": True})
    for r in published_rows("search", COLUMNS):
        sec, build = re.match(r"(\w+) \(database built in (\d+) s\)", r.pop("_heading")).groups()
        if not cache.get(f"{sec}|db"):
            cache.put(f"{sec}|db", {"build_s": float(build), "published": True})
        cache.put(f"{sec}|{r['budget']}|{r['allocator']}", dict(r, section=sec, published=True))
    sp = re.search(r"prefix reuse\): (\d+) ms per candidate vs (\d+) ms", text)
    if sp:
        a, b = float(sp.group(1)) / 1000, float(sp.group(2)) / 1000
        cache.put("speed", {"with reuse": a, "full model": b, "speedup": b / a, "published": True})
    log.info("adopted %d published rows of docs/benchmarks.md", len(cache.rows))


def measure_speedup(model, tok, windows, n: int = 24) -> dict:
    """Time per candidate with and without prefix reuse, on budget-preserving mutations of uniform 3-bit."""
    db = open_database(model, tok, "quant", data=windows, **SECTIONS["quant"]["settings"])  # built above
    p = make_problem(db, Budget("bits", 3.0))
    from modelpress.allocate import ALLOCATORS

    parent = ALLOCATORS.build("uniform").allocate(p)
    out = {}
    state = PlanState(model, db)  # the model is dense here (the sections restored it)
    fast = KLFitness(model, state, p, windows.calib[:8], reuse_prefix=True)
    slow = KLFitness(model, state, p, windows.calib[:8], reuse_prefix=False, reference=fast.ref)
    rng = np.random.default_rng(0)
    kids = [mutate(p, parent, rng) for _ in range(n)]
    sample = (0,)
    for name, f in (("with reuse", fast), ("full model", slow)):
        f(parent, sample, parent=parent)  # parent states (shared by all offspring in a generation)
        t = time.time()
        for k in kids:
            f(k, sample, parent=parent)
        out[name] = (time.time() - t) / n
    state.restore()
    out["speedup"] = out["full model"] / out["with reuse"]
    return out


def gap_closed(cache: RowCache, dense: dict, extended: list[str]) -> str:
    """The 3-bit target, read off the rows: the share of uniform's perplexity gap to dense that each
    measuring allocator closes, against the uniform row of its own database."""
    head = "quant|3 bits/weight|"
    out, best = [], -1.0
    for k in [head + "evolutionary"] + [k for k in extended if k.startswith(head) and "|uniform, " not in k
                                        and "|dp, " not in k]:
        r, u = cache.get(k), own_uniform(cache, k, extended)
        if r and u and dense:
            share = (u["ppl"] - r["ppl"]) / (u["ppl"] - dense["ppl"])
            best = max(best, share)
            out.append(f"`{k.split('|')[2]}` {100 * share:.0f}%")
    if not out:
        return ""
    return ("Target at 3 bits: close at least half of uniform's perplexity gap to dense. Closed (each against the "
            "uniform row of its database): " + ", ".join(out) + (". Met.\n" if best >= 0.5 else ". Not met.\n"))


def render(cache: RowCache) -> None:
    dense = cache.get("dense") or {}
    parts = ["## Budget-optimal search (`bench/search.py`)\n",
             "smollm2-135m, calibration 128 x 512 tokens of `pydoc` (databases and fitness), evaluation on the "
             f"first {N_EVAL} of the 88 held-out 512-token windows of the uniform table (to keep the CPU run short). Quantization levels: GPTQ 2-6 bits, "
             "group 64, asymmetric, act-order, clipping search (`mse`, GPTQ's default), each level's database built "
             "sequentially. Sparsity levels: SparseGPT without the refit of the kept weights (`refit_iters=0`: the "
             "database predates the refit, now SparseGPT's default) in equal absolute steps (24 levels up to 90% on the largest layers, fewer on smaller ones), every "
             "level computed from the dense model's inputs (not sequentially), so the sparsity section's `uniform` "
             "row is worse than the uniform table's sequential SparseGPT at the same sparsity; its rows compare "
             "allocators over one database. Depth: 60 sub-blocks (30 attention + 30 MLP). `uniform` at a non-integer "
             "bit target mixes the two neighbouring levels evenly. Evolutionary: fitness = KL to dense on "
             "calibration tokens (top-512 + tail), 20 generations x 12 offspring, survivors 2/1 on 512/1536 tokens, "
             "initialised from the best (by fitness) of the model-free allocators the database supports: uniform, dp, "
             "and owl or block-influence in their sections (the depth rows were searched before block-influence "
             "joined that choice: they started from the better of uniform and dp). "
             "A short run: the CPU budget of this machine. "
             f"Dense perplexity: {dense.get('ppl', float('nan')):.3f}. Machine: {machine()}.\n"]
    def order(k: str):  # uniform, then sensitivity, then searches by their last stage's tokens and length
        r = cache.get(k) or {}
        gens = re.search(r"(\d+) generations", k.split("|")[2])
        last = np.ravel((r.get("evo") or {}).get("tokens") or 0)[-1]
        return (bool(suffix_of(k)), "|evolutionary, " in k, "|uniform, " not in k,
                int(last), int(gens.group(1)) if gens else 0, k)

    extended = sorted((k for k in cache.rows if k.count("|") == 2 and ", " in k.split("|")[2]),  # rows of `--extend`
                      key=order)
    continued = [k for k in extended if (cache.get(k) or {}).get("from_checkpoint")]
    shared = [k for k in extended if suffix_of(k)]
    restarted = [k for k in extended if "|evolutionary, " in k and not (cache.get(k) or {}).get("from_checkpoint")
                 and not k.endswith("sensitivity start") and k not in shared]
    measured = [k for k in extended if "|sensitivity, " in k and k not in shared]
    for sec in SECTIONS:
        spec = SECTIONS[sec]
        keys = [k for b in spec["budgets"] for k in  # table order; extended searches after their budget's rows
                [f"{sec}|{b.label()}|{a}" for a in spec["allocators"]]
                + [e for e in extended if e.startswith(f"{sec}|{b.label()}|")]]
        rows = [dict(r, ppl_ratio=r.get("ppl_ratio") or r["ppl"] / dense["ppl"])  # published rows keep theirs
                for r in map(cache.get, keys) if r and dense]
        if not rows:
            continue
        db = cache.get(f"{sec}|db") or {}
        parts.append(f"### {sec} (database built in {db.get('build_s', 0):.0f} s)\n")
        parts.append(print_table(rows, COLUMNS) + "\n")
    parts.append(gap_closed(cache, dense, extended))
    missing = [f"{sec} {b.label()} {a}" for sec, spec in SECTIONS.items() for b in spec["budgets"]
               for a in spec["allocators"] if not cache.get(f"{sec}|{b.label()}|{a}")]
    parts.append(not_run_note(missing, "search.py") + "Database build time counts the run that finished it "
                 "(a build interrupted and resumed only reports the resumed part); an evolutionary search "
                 "resumed from its checkpoint likewise reports only the resumed generations (depth, 4 dropped: "
                 "generations 14-20)"
                 + "".join(f"; `{k.split('|')[2]}` ({k.split('|')[1]}) continued the shorter search of the same "
                           "settings from its checkpoint (`--extend`), so its search s covers only the generations it "
                           "added" for k in continued)
                 + "".join(f". `{k.split('|')[2]}` ({k.split('|')[1]}) had no checkpoint to continue (a new checkout "
                           f"has no database: it was rebuilt in {(cache.get(k) or {}).get('db_build_s') or 0:.0f} s "
                           "with the code of that day, whose float summation order can make its levels differ "
                           "slightly from the original database's), so it ran all its generations from the "
                           "start; the `uniform, database of the ...` row above it is uniform on that same rebuilt "
                           "database: compare the two with each other" for k in restarted)
                 + "".join(f". `{k.split('|')[2]}` ({k.split('|')[1]}) is the `sensitivity` allocator: from the "
                           "uniform plan, each layer moved alone to each neighbouring level (one evaluation per layer "
                           "and neighbour on one sample of that many calibration tokens; farther levels extrapolated "
                           "from the layer errors), then dp on those measured KL changes; a `..., sensitivity "
                           "start` row after it is a new search (12 offspring, survivors 2/1, the row's tokens per "
                           "selection stage) started from the best by fitness of uniform, dp and that plan (its "
                           "search s excludes the measurements, which it read back from the sensitivity row's "
                           "cache); they all ran on the database rebuilt "
                           f"in {(cache.get(k) or {}).get('db_build_s') or 0:.0f} s, with the `uniform, database of "
                           "the ...` row as their uniform" for k in measured)
                 + "".join(f". Rows ending `{suffix}` ran on a database of the same levels with every level of a "
                           "layer computed in one sequential pass on the inputs the layer sees when the layers "
                           f"before it are at that bit-width (`sequential_level`), built in "
                           f"{(cache.get('quant|db' + suffix) or {}).get('build_s') or 0:.0f} s; the other rows' "
                           "database calibrates each level on the inputs of the model at that same level. The "
                           f"`uniform{suffix}` row is their uniform (its 3-bit levels are computed as in the "
                           "other database, so it matches the rebuilt database's uniform)"
                           for suffix in sorted({suffix_of(k) for k in shared}))
                 + ". The 4-bit "
                 "evolutionary search finished in a run stopped before its evaluation; the next run read its plan "
                 "back, so its search time is not known (the 2.5- and 3-bit searches of the same size took 734 and 695 s). The depth and sparsity rows and the quantization database (built at 1 thread) ran beside other work on the same 2 cores, "
                 "so their times are inflated; compare quality, not time, across sections.\n")
    sp = cache.get("speed")
    if sp:
        parts.append(f"Fitness fast path (prefix reuse): {1000 * sp['with reuse']:.0f} ms per candidate vs "
                     f"{1000 * sp['full model']:.0f} ms running the whole model, on one 512-token window, for "
                     f"budget-preserving mutations of uniform 3-bit: **{sp['speedup']:.2f}x**.\n")
    write_section("search", "\n".join(parts))


if __name__ == "__main__":
    main()
