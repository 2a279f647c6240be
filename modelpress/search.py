"""Budget-optimal compression: level database -> allocation under a budget -> compressed model."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from pathlib import Path


from .allocate import ALLOCATORS, Problem
from .allocate.budget import Budget, make_problem
from .allocate.plan import Plan
from .api import Compressed, as_windows, export_path
from .data.windows import DataConfig, Windows, get_windows
from .errors import ConfigError
from .eval.fitness import KLFitness
from .export.checkpoint import CheckpointWriter, finish_streamed, round_to_storage, write_streamed_block
from .levels import KINDS, LevelDB, PlanState
from .levels.kinds import Kind, kind_for_budget
from .models.arch import Arch
from .models.streamed import SHARD_BYTES as STREAM_SHARDS, block_forwards, streamed
from .registry import config_dict
from .utils.device import takes_compute_dtype
from .utils.dist import is_main
from .utils.progress import progress
from .utils.io import slug

log = logging.getLogger(__name__)


@dataclasses.dataclass
class SearchSettings:
    """Fitness settings for allocators that measure the model."""

    fitness_windows: int = 16  # windows of the calibration source the fitness samples from
    validation_windows: int = 4  # windows after those: the fixed validation sample
    # True: fitness and validation windows are drawn beyond the calibration windows (same source,
    # disjoint), so the search does not favour levels for fitting the text it is measured on; a
    # search on the levels' own calibration text picks low levels that overfit it (docs/presets.md).
    # False: the first calibration windows, as before.
    held_out: bool = True
    topk: int = 512
    batch_size: int = 4
    reuse_prefix: bool = True

    def __post_init__(self) -> None:
        if self.fitness_windows < 1:
            raise ConfigError(f"fitness_windows must be at least 1, got {self.fitness_windows}")
        if self.validation_windows < 0:
            raise ConfigError(f"validation_windows must be 0 or more, got {self.validation_windows}")

@dataclasses.dataclass
class SearchResult:
    plan: Plan
    problem: Problem
    db: LevelDB
    history: list[dict]
    seconds: dict[str, float]
    fitness_stats: dict | None = None
    resumed_at: int = 0  # generation a checkpointed search resumed at (0: it started fresh)
    reference: list | None = None  # the fitness's dense top-K cache: pass it to the next allocate on these windows


def make_kind(kind: str | Kind, **settings) -> Kind:
    if isinstance(kind, Kind):
        return kind
    return KINDS.build(kind, **settings)


@takes_compute_dtype
def open_database(model, tokenizer, kind: str | Kind = "quant", *, data: DataConfig | Windows | None = None,
                  db: str | Path | None = None, batch_size: int = 8, device=None, **kind_settings) -> LevelDB:
    """Open (building or resuming as needed) the level database of `model` for `kind`."""
    windows = as_windows(tokenizer, data, model)
    k = make_kind(kind, **kind_settings)
    from .utils.dist import barrier, main_first, reduce_int, world

    with main_first():  # data-parallel workers: rank 0 creates the folder, the others open it
        d = LevelDB.open_or_create(db, model, k, windows, tokenizer=tokenizer)
    t = time.time()
    d.build(model, windows, batch_size=batch_size, device=device)
    if world()[1] > 1:  # data-parallel workers wrote each other's units: wait for all, then read them
        barrier()
        d.refresh()
    d.meta.setdefault("build_seconds", 0.0)
    elapsed = time.time() - t
    if reduce_int(int(elapsed > 1), "max"):  # save_meta is collective: every rank decides alike
        d.meta["build_seconds"] += elapsed
        d.save_meta()
    return d


def fitness_windows(tokenizer, data: DataConfig | Windows | None, settings: SearchSettings, model=None) -> Windows:
    """The windows a search's fitness samples (the first `fitness_windows`) and validates on (the
    `validation_windows` after them). Windows are taken as given; for a DataConfig (the calibration
    data) with `settings.held_out`, windows of its source disjoint from its calibration windows."""
    if isinstance(data, Windows):
        return data
    data = data or DataConfig()
    if not settings.held_out:
        return as_windows(tokenizer, data, model)
    n = settings.fitness_windows + settings.validation_windows
    return get_windows(tokenizer, dataclasses.replace(data, n_samples=n), model=model, after=data.n_samples)


@takes_compute_dtype
def allocate(model, db: LevelDB, budget: Budget, allocator: str = "evolutionary", *,
             data: DataConfig | Windows | None = None, tokenizer=None, settings: SearchSettings | None = None,
             state: PlanState | None = None, reference: list | None = None, starts: dict[str, Plan] | None = None,
             **allocator_settings) -> SearchResult:
    """Choose a level per unit under `budget`. Measuring allocators sample `fitness_windows(data)`
    and run the model through `state`
    (the caller's PlanState, if it keeps one) and leave it dense; `reference` is an earlier
    result's `.reference` on the same windows (the dense model's top-K, not computed again).
    `starts`: named plans the evolutionary search scores among its candidate starting points (e.g.
    a plan close to a llama.cpp preset's types, `levels.kinds.gguf.plan_for_types`), each brought
    within the budget first."""
    settings = settings or SearchSettings()
    problem = make_problem(db, budget)
    alloc = ALLOCATORS.build(allocator, **allocator_settings)
    if starts:
        if not alloc.takes_starts:
            raise ConfigError(f"start plans start the evolutionary search, not {allocator!r}; use --allocator evolutionary")
        problem.extra["starts"] = {name: plan.choice(problem) for name, plan in starts.items()}
    lacking = [k for k in alloc.needs if k not in problem.extra]
    if lacking:
        raise ConfigError(f"allocator {allocator!r} does not apply to kind {db.kind.registered_name!r} "
                          f"(it needs {', '.join(lacking)} per unit)")
    fitness = None
    t0 = time.time()
    if alloc.needs_fitness:
        windows = fitness_windows(tokenizer, data, settings, model)
        state = state or PlanState(model, db)
        fw, vw = settings.fitness_windows, settings.validation_windows
        validation = windows.calib[fw:fw + vw] if vw else None
        if vw and len(validation) < vw:
            log.warning("only %d calibration windows: the search's validation sample (%d windows after the %d "
                        "fitness windows) is %s", len(windows.calib), vw, fw,
                        f"{len(validation)} windows" if len(validation) else "left out")
            validation = validation if len(validation) else None
        fitness = KLFitness(model, state, problem, windows.calib[:fw], topk=settings.topk,
                            batch_size=settings.batch_size, reuse_prefix=settings.reuse_prefix,
                            reference=reference, validation=validation)
    t1 = time.time()
    try:
        result = alloc.run(problem, fitness)
    finally:
        if fitness is not None:
            state.restore()
    t2 = time.time()
    choice = result.choice
    plan = Plan.from_choice(problem, choice, db.kind.registered_name,
                            budget=dataclasses.asdict(budget), allocator=config_dict(alloc),
                            info={"cost": problem.cost(choice), "budget_cost": problem.budget,
                                  "estimated_error": problem.error(choice)})
    stats = None
    if fitness is not None:
        stats = {"evaluations": fitness.evaluations, "seconds": fitness.seconds, "blocks_run": fitness.blocks_run,
                 "validation_windows": len(fitness.validation), "start_validation": fitness.first_validation,
                 "final_validation": fitness.validate(choice), "selected_generation": result.selected_generation,
                 "start": result.start}
    return SearchResult(plan=plan, problem=problem, db=db, history=result.history,
                        seconds={"reference": t1 - t0, "search": t2 - t1}, fitness_stats=stats,
                        resumed_at=result.resumed_at, reference=fitness.ref if fitness is not None else None)


def materialize(model, tokenizer, db: LevelDB, plan: Plan, state: PlanState | None = None,
                out: str | Path | None = None) -> Compressed:
    """Put the plan's levels into `model` (in place) and return it as a Compressed model. A streamed
    model (models.streamed) is never whole in memory: its checkpoint is written to `out` block by
    block instead, and the result names it (`checkpoint`)."""
    plan.validate(db)
    if streamed(model) is not None:
        return _materialize_streamed(model, tokenizer, db, plan, out)
    state = state or PlanState(model, db, cache=False)
    state.apply(plan.levels)
    if db.kind.module_levels:
        units = {}
        dropped = [u for u, v in plan.levels.items() if v == "dropped"]
    else:
        units = {u: db.load(u, v) for u, v in plan.levels.items()}
        dropped = []
    round_to_storage(model, units)
    total = sum(p.numel() for p in model.parameters()) + sum(
        db.units[u].numel for u in dropped)
    return Compressed(model=model, tokenizer=tokenizer, units=units, dropped=dropped, plan=plan.to_dict(),
                      total_params=total)


def _materialize_streamed(model, tokenizer, db: LevelDB, plan: Plan, out: str | Path | None) -> Compressed:
    if out is None:
        raise ConfigError("a streamed model's plan is written to its checkpoint block by block: give out=")
    if not db.kind.streams:
        raise ConfigError(f"writing a {db.kind.registered_name} plan of a streamed model is not supported; "
                          "load the model in memory (without --stream)")
    stream, arch = streamed(model), Arch(model)
    by_block: dict[int | None, dict] = {}
    for u, v in plan.levels.items():
        by_block.setdefault(db.units[u].block if u.startswith(arch.blocks_name + ".") else None, {})[u] = v
    writer = CheckpointWriter(out, shard_bytes=STREAM_SHARDS) if is_main() else None
    with writer if writer is not None else contextlib.nullcontext():
        for i in progress(range(len(arch)), desc="write plan"):
            with stream.block(i):
                write_streamed_block(writer, model, i, {u: db.load(u, v) for u, v in by_block.get(i, {}).items()})
        outside = {u: db.load(u, v) for u, v in by_block.get(None, {}).items()}  # e.g. a GGUF embedding
        total = sum(p.numel() for p in model.parameters())
        finish_streamed(writer, model, outside, tokenizer=tokenizer, plan=plan.to_dict(), extra={"total_params": total})
    return Compressed(model=model, tokenizer=tokenizer, units={}, dropped=[], plan=plan.to_dict(), total_params=total,
                      checkpoint=str(out))


def load_plan(path: str | Path, db: LevelDB) -> Plan:
    plan = Plan.load(path)
    plan.validate(db)
    return plan


def start_plans(model, db: LevelDB, paths) -> dict[str, Plan]:
    """Plans a search may start from, by file: a plan.json, or (kind gguf) a GGUF file of this model
    whose per-tensor types become a plan (e.g. a llama.cpp preset: the search then scores a plan of
    the preset's types, each at its most accurate level, among its candidate starts)."""
    out = {}
    for path in paths:
        if not Path(path).is_file():
            raise ConfigError(f"--start-from {path}: no such file; give a plan.json a search wrote or a GGUF file")
        if Path(path).suffix == ".gguf":
            if db.kind.registered_name != "gguf":
                raise ConfigError(f"a GGUF file ({path}) can start only a --kind gguf search; give a plan.json")
            from .levels.kinds.gguf import plan_for_types, types_of_file

            out[str(path)] = plan_for_types(db, types_of_file(model, path))
        else:
            out[str(path)] = load_plan(path, db)
    return out


@dataclasses.dataclass
class SearchConfig:
    """Everything one budget search needs, for the CLI and Python alike.

    >>> cfg = SearchConfig(Budget("bits", 3), kind_settings={"levels": (2, 3, 4)}, compare=("uniform",),
    ...                    out="out/smollm2-3bit")
    >>> report = modelpress.search(model, tokenizer, cfg)

    `kind` defaults to the kind made for the budget (bits, mb: quant; sparsity; drop: depth).
    Machine-sized defaults (CPU vs GPU) are named configs in `modelpress.presets`."""

    budget: Budget
    kind: str | None = None
    kind_settings: dict = dataclasses.field(default_factory=dict)
    allocator: str = "evolutionary"
    allocator_settings: dict = dataclasses.field(default_factory=dict)
    compare: tuple[str, ...] = ()  # allocators also run and evaluated (e.g. the uniform baseline)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    fitness: SearchSettings = dataclasses.field(default_factory=SearchSettings)
    db: str | Path | None = None  # level database folder (default: in the cache)
    out: str | Path | None = None  # checkpoint folder, or a .gguf file for kind gguf (default: out/<...>)
    plan_file: str | Path | None = None  # apply this plan.json instead of allocating
    start_from: tuple[str | Path, ...] = ()  # plan.json / GGUF files the evolutionary search also starts from
    evaluate: bool = True
    eval_suite: str | list[str] = "default"
    n_eval: int | None = 16  # held-out windows per evaluation domain
    export: str | None = None  # also write the chosen model as "hf" (OUT-hf) or "compressed-tensors" (OUT-ct)

    def __post_init__(self) -> None:
        if not isinstance(self.budget, Budget):
            self.budget = Budget(*self.budget) if isinstance(self.budget, (tuple, list)) else Budget(**self.budget)
        self.kind = self.kind or kind_for_budget(self.budget.kind)
        KINDS.get(self.kind)
        for name in (self.allocator, *self.compare):
            ALLOCATORS.get(name)
        self.compare = tuple(self.compare)
        self.start_from = tuple(self.start_from)
        if self.start_from and self.plan_file is not None:
            raise ConfigError("--plan applies a plan without searching; --start-from starts a search: give one")
        if self.export is not None:
            from .api import EXPORTS

            if self.export not in EXPORTS:
                raise ConfigError(f"unknown export format {self.export!r}; use one of {', '.join(EXPORTS)} "
                                  "(GGUF: --kind gguf with --out FILE.gguf)")
            if self.export == "compressed-tensors" and not KINDS.get(self.kind).integer_levels:
                raise ConfigError(f"--export compressed-tensors holds integer-quantized layers; kind {self.kind} "
                                  "makes other levels (use --kind quant, or --export hf)")
            if self.out is not None and Path(self.out).suffix == ".gguf":
                raise ConfigError(f"a .gguf --out is the export; --export {self.export} needs a checkpoint "
                                  "folder for --out")


@takes_compute_dtype
def search(model, tokenizer, config: SearchConfig, *, model_name: str | None = None, device=None) -> dict:
    """Build/resume the database, allocate (and the `compare` baselines), evaluate every plan on
    every domain of the evaluation suite, save the chosen one as a checkpoint with plan.json,
    report.json/.md and two PNG plots; returns the report. Under data-parallel workers
    (utils.dist) every rank builds and searches, and the ranks other than 0 return {}."""
    from .data.suites import suite_windows
    from .eval.suite import SuiteReference, evaluate_suite, suite_columns, suite_row
    from .plots import plot_fitness, plot_levels
    from .models.moe import unfuse_experts
    from .report import write_report
    from .utils import dist

    unfuse_experts(model)  # a MoE's experts as units of their own (models.moe)
    stream = streamed(model) is not None  # blocks on disk: block-streamed forwards, checkpoint written block by block
    if stream and (config.export is not None or (config.out is not None and Path(config.out).suffix == ".gguf")):
        raise ConfigError("a streamed search writes its checkpoint block by block; export it afterwards "
                          "(`modelpress export FORMAT CHECKPOINT`)")
    if stream and not KINDS.get(config.kind).streams:
        raise ConfigError(f"a {config.kind} search needs the model in memory; run it without --stream")
    main = dist.is_main()  # data-parallel workers: all build and search, rank 0 evaluates and writes
    cfg = config
    budget, kind, allocator = cfg.budget, cfg.kind, cfg.allocator
    model_name = model_name or getattr(model.config, "_name_or_path", "") or type(model).__name__
    t_start = time.time()
    out = Path(cfg.out) if cfg.out is not None else Path("out") / slug(
        f"{Path(model_name).stem}-{kind}-{budget.label()}-{allocator}")
    with dist.main_first():  # text sampled from the model is made once and cached
        windows = as_windows(tokenizer, cfg.data, model)
    t0 = time.time()
    database = open_database(model, tokenizer, kind, data=windows, db=cfg.db, device=device, **cfg.kind_settings)
    build_s = time.time() - t0
    rows: list[dict] = []
    ref = domains = None
    evaluate = cfg.evaluate and main
    if evaluate:
        domains = suite_windows(tokenizer, cfg.eval_suite, seq_len=windows.config.seq_len, n_eval=cfg.n_eval)
        with block_forwards(model):
            ref = SuiteReference(model, domains)
        rows.append({"label": "dense", **suite_row(ref.dense, ref.dense), "kl": 0.0,
                     "size_mb": (database.meta["fixed_bytes"] + sum(
                         2 * u.numel for u in database.units.values())) / 1e6})
    results: dict[str, SearchResult] = {}
    state = PlanState(model, database)
    reference = None  # the fitness's dense top-K, computed once for every measuring allocator
    fit_windows = None  # the windows they measure on (held out from the database's by default)
    for name in [*cfg.compare, allocator]:
        if name in results:
            continue
        kw = dict(cfg.allocator_settings) if name == allocator else {}
        if name == allocator and cfg.plan_file is not None:
            plan = load_plan(cfg.plan_file, database)
            problem = make_problem(database, budget)
            results[name] = SearchResult(plan=plan, problem=problem, db=database, history=[], seconds={})
            continue
        resume = ALLOCATORS.get(name).resume_setting
        if name == allocator and resume and resume not in kw:  # long allocators resume from a file beside the db
            kw[resume] = str(database.path / "searches" / f"{budget.kind}-{budget.value:g}-{name}.json")
        if fit_windows is None and ALLOCATORS.get(name).needs_fitness:
            with dist.main_first():  # self-generated text is made once and cached
                fit_windows = fitness_windows(tokenizer, cfg.data, cfg.fitness, model)
        starts = start_plans(model, database, cfg.start_from) if name == allocator and cfg.start_from else None
        results[name] = allocate(model, database, budget, name, data=fit_windows, settings=cfg.fitness, state=state,
                                 reference=reference, starts=starts, **kw)
        reference = results[name].reference or reference
        log.info("%s: %s", name, results[name].plan.info)
    if not main:
        return {}
    for name, res in results.items():
        row = {"label": name, **res.seconds, "cost": res.plan.info.get("cost"),
               "size_mb": _plan_mb(database, res), "bits_per_weight": _plan_bits(database, res)}
        if evaluate:
            state.apply(res.plan.levels)
            with block_forwards(model, on_load=state.load_levels):
                row.update(suite_row(evaluate_suite(model, domains, ref, desc=f"eval {name}"), ref.dense))
        rows.append(row)
    if evaluate and "uniform" in results and allocator != "uniform":
        by = {r["label"]: r for r in rows}
        worse = [d for d in domains.names if by[allocator][f"ppl:{d}"] >= by["uniform"][f"ppl:{d}"]]
        if worse:
            log.warning("the %s plan is not better than uniform on: %s", allocator, ", ".join(worse))
        by[allocator]["beats_uniform_on_every_domain"] = not worse
    chosen = results[allocator]
    c = materialize(model, tokenizer, database, chosen.plan, state=state, out=out if stream else None)
    report_dir, exported = out, None
    if stream:
        pass  # written by materialize
    elif out.suffix == ".gguf":  # a GGUF file for llama.cpp, with the report in a folder beside it
        from .export.ggufio import export_gguf, write_llama_quantize_recipe
        from .ops.ggmlweight import GGMLWeight

        if not all(isinstance(w, GGMLWeight) for w in c.units.values()):
            raise ConfigError("only --kind gguf writes a .gguf file; give a folder for --out")
        export_gguf(model, out, weights=c.units, tokenizer=tokenizer)
        recipe = write_llama_quantize_recipe(model, out, c.units)
        log.info("llama.cpp alone rebuilds %s with: %s (%s)", out, recipe["command"], recipe["source"])
        report_dir = out.with_name(out.stem + ".report")
        report_dir.mkdir(parents=True, exist_ok=True)
        predicted = database.meta["fixed_bytes"] + sum(int(database.level_meta(u, v)["nbytes"])
                                                       for u, v in chosen.plan.levels.items())
        chosen.plan.info.update(file_bytes=out.stat().st_size, predicted_bytes=predicted, llama_quantize=recipe)
    else:
        c.save(out)
        if cfg.export is not None:
            exported = c.export(cfg.export, export_path(out, cfg.export))
    out_files = report_dir
    chosen.plan.save(out_files / "plan.json")
    units = list(database.units)  # tied layers are plotted one by one
    plot_levels(out_files / "levels.png", {n: r.plan.levels for n, r in results.items()}, units,
                [database.units[u].group for u in units], [database.units[u].block for u in units],
                ylabel=database.kind.ylabel)
    plot_fitness(out_files / "fitness.png", chosen.history)
    report = {
        "model": model_name, "method": {"kind": kind, **cfg.kind_settings, "allocator": allocator,
                                        "allocator_settings": cfg.allocator_settings},
        "budget": budget.label(), "data": dataclasses.asdict(windows.config), "rows": rows,
        "database": {"path": str(database.path), "build_seconds": build_s},
        "history": chosen.history,
        "fitness": chosen.fitness_stats and {**chosen.fitness_stats, "held_out": cfg.fitness.held_out},
        "seconds": time.time() - t_start,
        "checkpoint": str(out),
        **({"export": exported} if cfg.export else {}),
        "evaluation": domains.info(cfg.eval_suite) if domains else None,
        "columns": [("label", "allocator"), *suite_columns(domains.names if domains else []),
                    ("size_mb", "size MB"), ("bits_per_weight", "bits/weight (layers)"), ("search", "search s")],
    }
    write_report(out_files, report)
    with open(out_files / "report.md", "a") as f:
        f.write("\n![level per unit](levels.png)\n\n![fitness per generation](fitness.png)\n")
    return report


def _plan_mb(db: LevelDB, res: SearchResult) -> float:
    """Stored size of a plan: packed units + fixed tensors (header excluded)."""
    return (db.meta["fixed_bytes"] + sum(int(db.level_meta(u, v)["nbytes"]) for u, v in res.plan.levels.items())) / 1e6


def _plan_bits(db: LevelDB, res: SearchResult) -> float | None:
    if db.kind.module_levels:
        return None
    n = sum(db.units[u].numel for u in res.plan.levels)
    return 8.0 * sum(int(db.level_meta(u, v)["nbytes"]) for u, v in res.plan.levels.items()) / n


__all__ = ["SearchConfig", "SearchResult", "SearchSettings", "allocate", "load_plan", "make_kind", "materialize",
           "open_database", "search"]
