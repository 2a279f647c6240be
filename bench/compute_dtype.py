"""bfloat16 vs float32 forwards on smollm2-135m: speed of each stage and quality on every domain.

Every row runs the same work twice, back to back in one process, once with `compute_dtype=
"float32"` and once with `"bfloat16"` (the default where the CPU has AMX / AVX512-BF16), and
reports both times and their ratio (absolute times vary between machines; the ratio much less).
Quality rows compress with the default calibration (mix+self, 128 windows) and evaluate each
model in its own compute dtype against the dense model in that dtype, on every domain of the
default suite. Rows are cached (bench/results/compute_dtype.json); `--only SUBSTRING` runs a
subset.

`--spread` measures what those quality differences compare with: the GPTQ rows compressed again
from a second calibration draw (seed 1), in both dtypes, so the change bfloat16 makes sits beside
the change another sample of the same calibration source makes in float32 (section
`compute_dtype_spread`, rows in bench/results/compute_dtype_spread.json).

    python bench/compute_dtype.py [--only SUBSTRING] [--force] [--n-eval 16] [--render] [--spread]
"""
from __future__ import annotations

import copy
import gc
import shutil
import time

import numpy as np

from common import bench_args, SCRATCH, RowCache, machine, measure_rows, not_run_note, print_table, write_section

import modelpress as mp
from modelpress.allocate.budget import Budget, make_problem
from modelpress.data.suites import SUITES, suite_windows
from modelpress.eval.fitness import KLFitness
from modelpress.eval.suite import SuiteReference, evaluate_suite, suite_row
from modelpress.levels import PlanState
from modelpress.search import SearchSettings, allocate, open_database
from modelpress.utils.device import compute_dtype

DTYPES = ("float32", "bfloat16")
COMPRESS = {
    "GPTQ 4-bit g64": ("gptq", dict(bits=4, group_size=64)),
    "GPTQ 3-bit g64": ("gptq", dict(bits=3, group_size=64)),
    "SparseGPT 50%": ("sparsegpt", dict(sparsity=0.5)),
}
LEVELS = dict(levels=(2, 3, 4), group_size=64, sequential_level=3)  # the CPU demo's database
SEARCH = dict(generations=1, offspring=8, tokens=(1024, 4096), survivors=(2, 1))  # one generation of the CPU default
SPREAD = ("GPTQ 3-bit g64", "GPTQ 4-bit g64")
SEEDS = (0, 1)
ROWS = ["eval (dense, 3 domains)", "GPTQ 4-bit g64", "SparseGPT 50%", "level database 2/3/4", "fitness evaluation",
        "search generation", "GPTQ 3-bit g64"]  # the order they run in


class Ctx:
    def __init__(self, n_eval: int):
        self.base, self.tok = mp.load_model("smollm2-135m", device="cpu")
        self.domains = suite_windows(self.tok, SUITES["default"], seq_len=512, n_eval=n_eval)
        self.windows = self.calibration(0)
        self.refs: dict[str, SuiteReference] = {}
        self.dbs: dict[str, object] = {}

    def calibration(self, seed: int):
        return mp.get_windows(self.tok, mp.DataConfig(corpus="mix+self", n_samples=128, seq_len=512, seed=seed),
                              model=self.base)

    @staticmethod
    def db_path(dt: str):
        return SCRATCH / "compute_dtype-db" / dt

    def ref(self, dt: str) -> SuiteReference:
        if dt not in self.refs:
            with compute_dtype(dt):
                self.refs[dt] = SuiteReference(self.base, self.domains)
        return self.refs[dt]

    def db(self, dt: str, fresh: bool = False):
        """The level database built in `dt` (kept in .bench_cache for the fitness and search rows;
        `fresh` builds it again from nothing)."""
        if fresh:
            shutil.rmtree(self.db_path(dt), ignore_errors=True)
            self.dbs.pop(dt, None)
        if dt not in self.dbs:
            with compute_dtype(dt):
                self.dbs[dt] = open_database(self.base, self.tok, "quant", data=self.windows,
                                             db=self.db_path(dt), **LEVELS)
        return self.dbs[dt]


def timed(fn) -> float:
    t = time.time()
    fn()
    return time.time() - t


def measure(ctx: Ctx, key: str, dt: str, windows=None) -> dict:
    """One row's work in one dtype: seconds, plus quality columns for the compression rows
    (calibrated on `windows`, by default the seed-0 draw)."""
    if key in COMPRESS:
        method, kw = COMPRESS[key]
        model = copy.deepcopy(ctx.base)
        with compute_dtype(dt):
            s = timed(lambda: mp.compress(model, ctx.tok, method, data=windows or ctx.windows, **kw))
            ref = ctx.ref(dt)
            out = {"s": s, **suite_row(evaluate_suite(model, ctx.domains, ref), ref.dense)}
        del model
        gc.collect()
        return out
    if key == "level database 2/3/4":
        return {"s": timed(lambda: ctx.db(dt, fresh=True))}
    if key == "eval (dense, 3 domains)":
        with compute_dtype(dt):
            return {"s": timed(lambda: mp.evaluate_domains(ctx.base, ctx.tok, "default", n_eval=len(
                ctx.domains.windows[ctx.domains.names[0]])))}
    db = ctx.db(dt)
    if key == "fitness evaluation":  # one full-model KL of a random plan on 2 x 512 fitness tokens
        with compute_dtype(dt):
            state = PlanState(ctx.base, db)
            problem = make_problem(db, Budget("bits", 3.0))
            fit = KLFitness(ctx.base, state, problem, ctx.windows.calib[:16])
            rng = np.random.default_rng(0)
            choices = [[int(rng.integers(len(v))) for v in problem.extra["values"]] for _ in range(4)]
            for c in choices:  # decode every level once (PlanState caches them, as in a search)
                fit(c, (0, 1))
            t = time.time()
            for c in choices:
                fit(c, (2, 3))
            s = (time.time() - t) / len(choices)
            state.restore()
        return {"s": s}
    if key == "search generation":
        with compute_dtype(dt):
            settings = SearchSettings(fitness_windows=16, validation_windows=4)
            res = allocate(ctx.base, db, Budget("bits", 3.0), "evolutionary", data=ctx.windows, settings=settings,
                           **SEARCH)
        return {"s": res.seconds["search"]}
    raise KeyError(key)


def main() -> None:
    args = bench_args(__doc__, extra=lambda ap: ap.add_argument(
        "--spread", action="store_true", help="the GPTQ rows from a second calibration draw, in both dtypes"))
    if args.spread:
        return spread(args)
    cache = RowCache("compute_dtype", force=args.force)
    todo = [k for k in ROWS if (not args.only or args.only in k) and not cache.get(k)]
    if todo and not args.render:
        ctx = Ctx(args.n_eval)
        for key in todo:
            print(f"== {key}", flush=True)
            row = {"key": key}
            for dt in DTYPES:
                m = measure(ctx, key, dt)
                row.update({f"{k}:{dt}": v for k, v in m.items()})
                print(dt, m, flush=True)
            row["speedup"] = row["s:float32"] / row["s:bfloat16"]
            cache.put(key, row)
    render(cache.everything())


def render(cache: RowCache) -> None:
    rows = [cache.get(k) for k in ROWS if cache.get(k)]
    domains = [d for d in SUITES["default"] if any(f"ppl:{d}:float32" in r for r in rows)]
    speed = print_table(rows, [("key", "stage"), ("s:float32", "float32 s"), ("s:bfloat16", "bfloat16 s"),
                               ("speedup", "speedup")])
    qual_rows = []
    for r in rows:
        if "worst_ratio:float32" not in r:
            continue
        for dt in DTYPES:
            qual_rows.append({"key": r["key"], "dtype": dt, **{f"ppl:{d}": r.get(f"ppl:{d}:{dt}") for d in domains},
                              **{f"ratio:{d}": r.get(f"ratio:{d}:{dt}") for d in domains},
                              "worst_ratio": r.get(f"worst_ratio:{dt}"), "kl": r.get(f"kl:{dt}")})
        qual_rows.append({"key": r["key"], "dtype": "bf16 / fp32 ppl − 1 (%)",
                          **{f"ppl:{d}": 100 * (r[f"ppl:{d}:bfloat16"] / r[f"ppl:{d}:float32"] - 1) for d in domains}})
    qual = print_table(qual_rows, [("key", "operator"), ("dtype", "compute")]
                       + [(f"ppl:{d}", f"ppl {d}") for d in domains]
                       + [(f"ratio:{d}", f"{d} × dense") for d in domains]
                       + [("worst_ratio", "worst × dense"), ("kl", "KL to dense")])
    missing = [k for k in ROWS if not cache.get(k)]
    body = (
        "## Compute dtype: bfloat16 vs float32 forwards (`bench/compute_dtype.py`)\n\n"
        "smollm2-135m; each row runs its work in float32 and then in bfloat16 (autocast: float32 weights, "
        "bf16 matmuls; XᵀX summed, Cholesky/OBS, log-softmax and KL in float32), back to back in one process. "
        f"Stages: {', '.join(COMPRESS)} end to end on 128 × 512 mix+self windows; the CPU demo's level database "
        "(levels 2/3/4, g64, sequential at 3); one fitness evaluation (a random plan whose levels are already "
        "decoded, full model, 2 × 512 tokens, mean of 4); one generation of the CPU default search (8 offspring, 1024/4096 tokens); "
        "`modelpress eval` of the dense model on the three domains. Quality: each compressed model evaluated "
        "in its own compute dtype against the dense model in that dtype; the last line of each operator is the "
        "relative perplexity difference bf16 vs float32.\n\n"
        + not_run_note(missing, "compute_dtype.py")
        + f"Machine: {machine()}.\n\n" + speed + "\n\n" + qual)
    write_section("compute_dtype", body)


def spread(args) -> None:
    cache = RowCache("compute_dtype_spread", force=args.force)
    cells = {f"{op} | {dt} | seed {seed}": (op, dt, seed) for op in SPREAD for seed in SEEDS for dt in DTYPES}
    ctx: Ctx | None = None

    def one(cell: tuple) -> dict:
        nonlocal ctx
        ctx = ctx or Ctx(args.n_eval)
        op, dt, seed = cell
        return {"operator": op, "dtype": dt, "seed": seed, **measure(ctx, op, dt, ctx.calibration(seed)),
                "machine": machine()}

    measure_rows(cache, cells, args, one)
    rows = cache.everything().rows
    done = [rows[k] for k in cells if k in rows]
    if not done:
        return
    domains = [d for d in SUITES["default"] if f"ppl:{d}" in done[0]]
    get = {(r["operator"], r["dtype"], r["seed"]): r for r in done}
    table = [dict(r, label=f"{r['operator']}, {r['dtype']}, seed {r['seed']}") for r in done]
    pairs = [("bfloat16 − float32, seed 0", ("bfloat16", 0), ("float32", 0)),
             ("bfloat16 − float32, seed 1", ("bfloat16", 1), ("float32", 1)),
             ("seed 1 − seed 0, float32", ("float32", 1), ("float32", 0)),
             ("seed 1 − seed 0, bfloat16", ("bfloat16", 1), ("bfloat16", 0))]
    diffs = []
    for op in SPREAD:
        for label, a, b in pairs:
            ra, rb = get.get((op, *a)), get.get((op, *b))
            if ra and rb:
                d = {f"ppl:{x}": 100 * (ra[f"ppl:{x}"] / rb[f"ppl:{x}"] - 1) for x in domains}
                diffs.append({"label": f"{op}: {label}", **d,
                              "largest": max(abs(v) for v in d.values())})
    missing = [k for k in cells if k not in rows]
    body = ("## Compute dtype against calibration sampling (`bench/compute_dtype.py --spread`)\n\n"
            "smollm2-135m; each GPTQ row of `compute_dtype` compressed from two draws of the default calibration "
            "(128 × 512 tokens of mix+self, seed 0 and seed 1: other pydoc and State of the Union windows, other "
            "self-generated text), in float32 and in bfloat16, each evaluated in its own compute dtype against the "
            f"dense model in that dtype, {args.n_eval} held-out windows per domain. The second table puts the "
            "perplexity change bfloat16 makes beside the change another calibration sample makes (in %; "
            "largest = the largest absolute change over the domains).\n\n"
            + not_run_note(missing, "compute_dtype.py --spread")
            + f"Machine: {done[0]['machine']}.\n\n"
            + print_table(table, [("label", "compressed"), *[(f"ppl:{d}", f"ppl {d}") for d in domains],
                                  ("worst_ratio", "worst × dense"), ("kl", "KL to dense")])
            + "\n\n" + print_table(diffs, [("label", "perplexity change (%)"),
                                           *[(f"ppl:{d}", d) for d in domains], ("largest", "largest")]))
    write_section("compute_dtype_spread", body)


if __name__ == "__main__":
    main()
