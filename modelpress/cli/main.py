"""`modelpress` command line: a thin shell over the Python API.

Errors a user can cause print one line (no traceback) and exit with status 2.
"""
from __future__ import annotations

import functools
import logging
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from ..data.defaults import DEFAULT_CALIBRATION, DEFAULT_SUITE, N_EVAL
from ..errors import ConfigError, ModelpressError
from ..utils.io import slug
from ..utils.progress import enable_progress

console = Console()
err_console = Console(stderr=True)


class _OneLineErrors(typer.core.TyperGroup):
    """Usage errors (a wrong type, an unknown option, a missing argument) as one line naming the
    option and where the help is, like every other error, instead of click's framed block."""

    # click's exception classes, wherever this typer keeps its click (newer ones vendor it)
    _usage_error = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")
    _click_error = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except self._usage_error as e:
            if type(e).__name__ == "NoArgsIsHelpError" and e.ctx is not None:  # `modelpress` alone: the help
                typer.echo(e.ctx.get_help())
            else:
                where = e.ctx.command_path if e.ctx is not None else "modelpress"
                err_console.print(f"[bold red]error:[/] {e.format_message()} (see `{where} --help`)",
                                  highlight=False, soft_wrap=True)
            rv = 2
        except _OneLineErrors._click_error as e:  # e.g. a file option click could not open
            err_console.print(f"[bold red]error:[/] {e.format_message()}", highlight=False, soft_wrap=True)
            rv = e.exit_code
        except typer.Abort:
            err_console.print("interrupted")
            rv = 130
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(cls=_OneLineErrors, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Compress neural networks to a budget.")


def _setup(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "accelerate", "urllib3", "filelock", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except Exception:  # pragma: no cover
        pass
    # a terminal gets bars; a pipe or a file (make demo | tee log, CI) gets timestamped lines
    enable_progress("bars" if sys.stderr.isatty() else "lines")


def command(fn):
    """Run a command, turning modelpress errors into one clean line."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from ..utils.device import compute_dtype
        from ..utils.dist import finish, launched

        try:
            if launched() and "workers" not in kwargs:  # verbs with --workers run under torchrun
                raise ConfigError(f"`modelpress {fn.__name__.removesuffix('_cmd')}` runs in one process: start "
                                  "it without torchrun (`compress --workers N` calibrates on several)")
            with compute_dtype(kwargs.get("compute_dtype")):  # verbs that run the model take --compute-dtype
                out = fn(*args, **kwargs)
            finish()  # torchrun's workers leave their group together (a failed one exits: torchrun ends the rest)
            return out
        except ModelpressError as e:
            err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(2)
        except KeyboardInterrupt:
            err_console.print("interrupted")
            raise typer.Exit(130)

    return wrapper


def print_rows(rows: list[dict], columns: list[tuple[str, str]], title: str | None = None) -> None:
    from ..report import fmt

    t = Table(title=title)
    for _, head in columns:
        t.add_column(head, justify="right" if head != "model" else "left")
    for r in rows:
        t.add_row(*[fmt(r.get(k)) for k, _ in columns])
    console.print(t)


def _data_config(data: str, n_samples: int, seq_len: int, seed: int, n_eval: Optional[int]):
    from ..data import DataConfig

    return DataConfig(corpus=data, n_samples=n_samples, seq_len=seq_len, seed=seed, n_eval=n_eval)


def _suite(tok, eval_suite: str, seq_len: int, n_eval: Optional[int]):
    from ..data import suite_windows

    domains = suite_windows(tok, eval_suite, seq_len=seq_len, n_eval=N_EVAL if n_eval is None else n_eval)
    _warn_skipped(domains.skipped)
    return domains


def _warn_skipped(skipped: dict) -> None:
    for name, why in skipped.items():
        err_console.print(f"[yellow]evaluation domain {name} skipped:[/] {why}", highlight=False, soft_wrap=True)


DataOpt = typer.Option(DEFAULT_CALIBRATION, "--data",
                       help=f"calibration: {DEFAULT_CALIBRATION} (default), mix (pydoc + sotu), prose (sotu + wiki + "
                            "mobydick), self (text sampled from the model), pydoc, austen, chitchat, sotu, wiki, "
                            "mobydick, wikitext2, c4, a .txt file/folder, or parts joined by + (a:0.7+b:0.3)")
EvalSuiteOpt = typer.Option(DEFAULT_SUITE, "--eval-suite",
                            help="evaluation domains: default (pydoc, austen, chitchat), all (+ sotu, wiki, mobydick), or "
                                 "comma-separated corpora / .txt paths")
SamplesOpt = typer.Option(128, "--n-samples", help="calibration windows")
SeqOpt = typer.Option(512, "--seq-len", help="tokens per window")
SeedOpt = typer.Option(0, "--seed")
NEvalOpt = typer.Option(None, "--n-eval", help=f"held-out windows per evaluation domain (default {N_EVAL})")
DeviceOpt = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
WorkersOpt = typer.Option(1, "--workers", min=1, help="data-parallel calibration and search on this many processes "
                          "(starts torchrun; or run `torchrun --nproc_per_node N -m modelpress ...` yourself)")
ComputeOpt = typer.Option("auto", "--compute-dtype",
                          help="dtype of the model's forwards: auto (bfloat16 where the device does it fast, else "
                               "float32), bfloat16, float16, float32; statistics and solves stay float32")
VerboseOpt = typer.Option(False, "--verbose", "-v")
KVDataOpt = typer.Option("pydoc", "--data", help="text for the long windows: pydoc, austen, chitchat, sotu, or a "
                                                 ".txt file/folder")


@app.command("compress")
@command
def compress_cmd(
    model: str = typer.Argument(..., help="alias (smollm2-135m), .gguf file, HF folder or hub id"),
    method: Optional[str] = typer.Option(None, "--method", "-m", help="gptq, rtn, sparsegpt, wanda, magnitude"),
    bits: Optional[int] = typer.Option(None, "--bits", help="2..8"),
    group_size: Optional[int] = typer.Option(None, "--group-size", help="quantization group (0 = per row)"),
    sym: Optional[bool] = typer.Option(None, "--sym/--asym"),
    act_order: Optional[bool] = typer.Option(None, "--act-order/--no-act-order"),
    static_groups: Optional[bool] = typer.Option(None, "--static-groups/--dynamic-groups",
                                                 help="gptq act-order: groups as runs of columns in the original order "
                                                      "(what compressed-tensors / vLLM store; default with "
                                                      "--export compressed-tensors)"),
    mse: Optional[bool] = typer.Option(None, "--mse/--no-mse", help="clipping search for quantization ranges"),
    shrink: Optional[float] = typer.Option(None, "--shrink", help="gptq/sparsegpt: blend the Hessian with its "
                                           "diagonal, 0..1 (gptq default 0.1, sparsegpt 0)"),
    sparsity: Optional[float] = typer.Option(None, "--sparsity", help="unstructured sparsity 0..0.95"),
    pattern: Optional[str] = typer.Option(None, "--pattern", help="N:M sparsity, e.g. 2:4"),
    refit_iters: Optional[int] = typer.Option(None, "--refit-iters",
                                              help="sparsegpt: refit steps for the kept weights (default 30, 0 = off)"),
    drop: int = typer.Option(0, "--drop", help="remove this many attention/MLP sub-blocks (lowest influence)"),
    compensate: Optional[str] = typer.Option(None, "--compensate", help="low-rank error correction: eora"),
    rank: Optional[int] = typer.Option(None, "--rank",
                                       help="rank of the --compensate correction, or of --method svd/asvd (default 16)"),
    target_bits: Optional[float] = typer.Option(None, "--target-bits",
                                                help="budget mode: searched per-layer bit-widths averaging this"),
    target_mb: Optional[float] = typer.Option(None, "--target-mb", help="budget mode: total size in MB"),
    target_sparsity: Optional[float] = typer.Option(None, "--target-sparsity", help="budget mode: global sparsity"),
    sequential: bool = typer.Option(True, "--sequential/--no-sequential",
                                    help="feed compressed blocks' outputs to the next block"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="checkpoint folder (default out/MODEL-METHOD)"),
    export: Optional[str] = typer.Option(None, "--export", help="also write `hf` (a plain dequantized HF folder, OUT-hf) or `compressed-tensors` "
                                               "(packed, for vLLM / transformers, OUT-ct)"),
    evaluate: bool = typer.Option(True, "--eval/--no-eval", help="perplexity and KL before/after"),
    stream: bool = typer.Option(False, "--stream", help="models larger than memory: keep the decoder blocks on disk, "
                                "bring in one at a time and write the checkpoint block by block (a local folder "
                                "with safetensors, a .gguf or an alias; calibration on text, not `self`)"),
    eval_suite: str = EvalSuiteOpt,
    data: Optional[str] = typer.Option(None, "--data", help=DataOpt.help + "; with --stream the default is mix "
                                       "(text sampled from the model needs all of it in memory)"),
    n_samples: Optional[int] = typer.Option(None, "--n-samples", help="calibration windows (default 128)"),
    seq_len: int = SeqOpt, seed: int = SeedOpt,
    n_eval: Optional[int] = NEvalOpt, device: Optional[str] = DeviceOpt, compute_dtype: str = ComputeOpt,
    workers: int = WorkersOpt, verbose: bool = VerboseOpt,
):
    """Compress MODEL: one method for every Linear of its decoder blocks, or — with a budget
    (--target-bits / --target-mb / --target-sparsity) — per-layer levels found by evolutionary search."""
    _setup(verbose)
    from ..utils import dist

    export = _export_format(export)
    budget = target_bits is not None or target_mb is not None or target_sparsity is not None
    device = _workers(workers, device)
    evaluate = evaluate and dist.is_main()
    quant = dict(sym=sym, act_order=act_order, mse=mse, shrink=shrink, static_groups=static_groups)
    if export == "compressed-tensors":
        from ..export.compressed_tensors import exportable_settings

        if sparsity is not None or pattern is not None or target_sparsity is not None or compensate is not None:
            raise ConfigError("--export compressed-tensors holds integer-quantized layers only (no sparsity or "
                              "low-rank correction); use --export hf for a dense folder")
        quant = exportable_settings(quant, (method or "gptq") == "gptq")
        static_groups = quant["static_groups"]
    if stream:
        _refuse("--stream", {
            "--export": (export is not None, f"export the checkpoint afterwards: `modelpress export {export} OUT`"),
            "--compensate": (compensate is not None, "EoRA is not streamed yet; compress in memory"),
        })
    data = data or ("mix" if stream else DEFAULT_CALIBRATION)
    if budget:
        sparse = target_sparsity is not None
        _refuse("a budget (--target-bits/--target-mb/--target-sparsity)", {
            "--method": (method is not None, "the budget search chooses the method per layer"),
            "--bits": (bits is not None, "the budget sets the bits; levels are 2/3/4 (GPU: up to 6)"),
            "--sparsity": (sparsity is not None, "use --target-sparsity"),
            "--pattern": (pattern is not None, "N:M patterns are not searched; use --method sparsegpt --pattern"),
            "--drop": (bool(drop), "for searched depth use `modelpress search --drop N`"),
            "--compensate": (compensate is not None,
                             "for EoRA levels in a search use `modelpress search --kind joint --ranks 0,16`"),
            "--rank": (rank is not None, "--rank goes with --compensate or --method svd/asvd"),
            "--no-sequential": (not sequential, "the search's levels are always calibrated sequentially"),
            **{f"--{k.replace('_', '-')}": (v is not None and sparse, "it applies to quantization budgets")
               for k, v in quant.items()},
            "--refit-iters": (refit_iters is not None and not sparse, "it applies to --target-sparsity"),
            "--group-size": (group_size is not None and sparse, "it applies to quantization budgets"),
        })
        from ..presets import budget_config, machine_for

        level_settings = {k: v for k, v in quant.items() if v is not None}
        if refit_iters is not None:
            level_settings["refit_iters"] = refit_iters
        if group_size is not None:
            level_settings["group_size"] = group_size or None
        config = budget_config(_budget(target_bits, target_mb, target_sparsity, None), machine=machine_for(device),
                               corpus=data, n_samples=n_samples, seq_len=seq_len, seed=seed,
                               level_settings=level_settings, out=out, evaluate=evaluate, eval_suite=eval_suite,
                               n_eval=N_EVAL if n_eval is None else n_eval, export=export)
        return _run_search(model, config, device, stream=stream, compute_dtype=compute_dtype)
    n_samples = 128 if n_samples is None else n_samples
    rank = 16 if rank is None else rank
    from .. import api
    from ..eval.suite import SuiteReference, evaluate_suite, suite_row
    from ..models import load_model
    from ..report import report_columns, write_report

    kw = {k: v for k, v in dict(bits=bits, sym=sym, act_order=act_order, mse=mse, sparsity=sparsity, pattern=pattern,
                                refit_iters=refit_iters, shrink=shrink, static_groups=static_groups).items()
          if v is not None}
    if method in ("svd", "asvd"):
        kw["rank"] = rank
    if group_size is not None:
        kw["group_size"] = group_size or None
    if method is None:
        method = "gptq" if bits is not None or not (sparsity or pattern or drop) else ("sparsegpt" if (sparsity or pattern) else None)
        if method == "gptq" and "bits" not in kw:
            kw["bits"] = 4
    op = api.make_operator(method, **kw) if method else None
    label = (op.label() if op else "dense") + (f" +eora r{rank}" if compensate else "") + (f" drop{drop}" if drop else "")
    out = out or Path("out") / slug(f"{Path(model).stem}-{label}")

    t0 = time.time()
    if stream:
        with dist.main_first():  # rank 0 converts a GGUF once; the others read the converted folder
            m, tok = _open_streamed(model, device, compute_dtype)
    else:
        with dist.main_first():  # rank 0 fills the caches (a converted GGUF) the others read
            m, tok = load_model(model, device=device)
    calib = _data_config(data, n_samples, seq_len, seed, None)  # tokenized only if the method calibrates
    rows = []
    ref = domains = None
    if evaluate and stream:  # no dense reference: it would not fit; the checkpoint is evaluated alone
        domains = _suite(tok, eval_suite, seq_len, n_eval)
    elif evaluate:
        domains = _suite(tok, eval_suite, seq_len, n_eval)
        ref = SuiteReference(m, domains)
        rows.append({"label": "dense", **suite_row(ref.dense, ref.dense), "kl": 0.0,
                     "size_mb": sum(p.numel() for p in m.parameters()) * 2 / 1e6, "bits_per_param": 16.0})
    if dist.launched() and op is not None and op.stats != "none":
        with dist.main_first():  # text sampled from the model (--data self) is made once and cached
            calib = api.as_windows(tok, calib, m)
    c = api.compress(m, tok, op, data=calib, drop=drop, sequential=sequential, device=device,
                     compensate=compensate, rank=rank if compensate else None, out=out if stream else None)
    if not dist.is_main():  # every rank holds the same compressed model; rank 0 writes it
        return
    if not stream:
        c.save(out)
    if export is not None:
        c.export(export, api.export_path(out, export))
    info = api.info(out)
    row = {"label": label, "size_mb": info["size_mb"], "bits_per_weight": info["bits_per_weight"],
           "bits_per_param": info["bits_per_param"], "seconds": time.time() - t0}
    if evaluate and stream:  # the compressed model, packed: about its checkpoint's size in memory
        packed = api.load_compressed(out, device=device)
        row.update(suite_row(evaluate_suite(packed, domains, None, desc="eval compressed")))
    elif evaluate:
        row.update(suite_row(evaluate_suite(m, domains, ref, desc="eval compressed"), ref.dense))
    rows.append(row)
    columns = report_columns(domains.names if domains else [])
    report = {"model": model, "method": c.plan["method"], "budget": label, "data": c.plan["data"],
              "evaluation": domains.info(eval_suite) if domains else None, "checkpoint": info, "rows": rows,
              "compress_seconds": c.seconds, "columns": columns}
    write_report(out, report)
    print_rows(rows, columns, title=f"{model} → {out}")
    if export is not None:
        console.print(f"{export} folder: {api.export_path(out, export)}")


def _workers(workers: int, device: Optional[str]) -> Optional[str]:
    """`--workers N`: start this command again as N torchrun workers (and leave with their exit
    code); a torchrun worker joins its group and gets its own device."""
    from ..utils import dist

    if workers > 1 and not dist.launched():
        raise typer.Exit(dist.relaunch(workers, dist.without_option(sys.argv[1:], "--workers"), device))
    return dist.worker_device(device) if dist.init_from_env(device) else device


def _refuse(path: str, options: dict[str, tuple[bool, str]]) -> None:
    """One place per verb that says which given options do not apply to the path taken:
    `options` maps an option to (given and inapplicable, what to do instead)."""
    for opt, (bad, hint) in options.items():
        if bad:
            raise ConfigError(f"{opt} does not apply with {path}: {hint}")


def _parse_list(s: Optional[str], cast=int) -> Optional[tuple]:
    if s is None:
        return None
    try:
        return tuple(cast(x) for x in s.split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"expected a comma-separated list, got {s!r}") from None


def _budget(target_bits, target_mb, target_sparsity, drop):
    from ..allocate.budget import Budget

    given = [(k, v) for k, v in (("bits", target_bits), ("mb", target_mb), ("sparsity", target_sparsity),
                                 ("drop", drop)) if v is not None]
    if len(given) != 1:
        raise ConfigError("give exactly one budget: --target-bits, --target-mb, --target-sparsity or --drop")
    return Budget(*given[0])


def _open_streamed(model_name: str, device, compute_dtype: str):
    """(model, tokenizer) with the decoder blocks on disk (models.streamed); a 16-bit model streams in
    16 bits unless float32 forwards are asked for."""
    import torch

    from ..models.streamed import open_streamed

    sm = open_streamed(model_name, device=device, dtype=torch.float32 if compute_dtype == "float32" else "auto")
    return sm.model, sm.tokenizer


def _run_search(model_name: str, config, device, *, stream: bool = False, compute_dtype: str = "auto") -> None:
    from ..models import load_model
    from ..search import search

    from ..utils import dist

    with dist.main_first():  # rank 0 fills the caches (a converted GGUF) the others read
        m, tok = _open_streamed(model_name, device, compute_dtype) if stream else load_model(model_name, device=device)
    rep = search(m, tok, config, model_name=model_name, device=device)
    if not dist.is_main():  # rank 0 evaluates, writes and reports
        return
    out = Path(rep["checkpoint"])
    _warn_skipped((rep.get("evaluation") or {}).get("skipped", {}))
    print_rows(rep["rows"], [tuple(c) for c in rep["columns"]], title=f"{model_name} @ {rep['budget']} → {out}")
    fit = rep.get("fitness") or {}
    if fit.get("final_validation") is not None:  # allocators without a start plan (sensitivity) report no start
        console.print(f"search validation KL ({fit['validation_windows']} windows that never pick offspring): "
                      + (f"start ({fit.get('start') or '?'}) {fit['start_validation']:.5f} → "
                         if fit.get("start_validation") is not None else "")
                      + f"returned plan {fit['final_validation']:.5f}"
                      + (f" (generation {fit['selected_generation']})" if fit.get("selected_generation") is not None
                         else ""))
    report_dir = out.with_name(out.stem + ".report") if out.suffix == ".gguf" else out
    console.print(f"plan: {report_dir / 'plan.json'}   report: {report_dir / 'report.md'}   "
                  f"database: {rep['database']['path']} (built in {rep['database']['build_seconds']:.0f} s)")
    if rep.get("export"):
        console.print(f"{rep['export']['format']} folder: {rep['export']['path']}")
        for sch in rep["export"].get("schemes", []):
            w = sch["weights"]
            console.print(f"  {w['num_bits']}-bit {'sym' if w['symmetric'] else 'asym'} "
                          f"{'g' + str(w['group_size']) if w['group_size'] else 'per row'}: {sch['layers']} layers, "
                          f"vLLM kernel {sch['vllm']}")


def _export_format(export: Optional[str]) -> Optional[str]:
    from ..api import EXPORTS

    if export is not None and export not in EXPORTS:
        raise ConfigError(f"unknown export format {export!r}; use --export {' or '.join(EXPORTS)} "
                          "(GGUF: `modelpress export gguf`, or `search --kind gguf --out FILE.gguf`)")
    return export


@app.command("search")
@command
def search_cmd(
    model: str = typer.Argument(..., help="alias (smollm2-135m), .gguf file, HF folder or hub id"),
    kind: Optional[str] = typer.Option(None, "--kind", help="quant, sparsity, depth, joint, lowrank or gguf (default: from the budget)"),
    types: Optional[str] = typer.Option(None, "--types", help="gguf: GGML types to choose from, e.g. Q4_0,Q5_0,Q8_0"),
    imatrix: Optional[bool] = typer.Option(None, "--imatrix/--no-imatrix",
                                           help="gguf: quantize with an importance matrix from the calibration "
                                                "text, as llama-quantize --imatrix does"),
    gptq_levels: Optional[bool] = typer.Option(None, "--gptq/--no-gptq", help="gguf: also every type with codes "
                                               "chosen by GPTQ on its grid (K-quants: scales from llama.cpp's "
                                               "quantizer with the importance matrix)"),
    levels: Optional[str] = typer.Option(None, "--levels", help="quant/joint: bit-widths, e.g. 2,3,4,5,6"),
    sparsities: Optional[str] = typer.Option(None, "--sparsities", help="joint: sparsity levels, e.g. 0,0.5"),
    ranks: Optional[str] = typer.Option(None, "--ranks", help="joint: EoRA ranks, e.g. 0,16"),
    allow_drop: Optional[bool] = typer.Option(None, "--allow-drop/--no-drop", help="joint: a layer may be removed"),
    sequential_level: Optional[str] = typer.Option(None, "--sequential-level",
                                                   help="joint/quant: build every level from the inputs of the "
                                                        "model compressed at this level (e.g. w3), as GPTQ does"),
    ratios: Optional[str] = typer.Option(None, "--ratios", help="lowrank: ranks as shares of the dense bytes, e.g. 0.2,0.4,0.6"),
    group_size: Optional[int] = typer.Option(None, "--group-size", help="quant: group size (0 = per row)"),
    static_groups: Optional[bool] = typer.Option(None, "--static-groups/--dynamic-groups",
                                                 help="quant: act-order with groups in column order (default with "
                                                      "--export compressed-tensors)"),
    serve: Optional[str] = typer.Option(None, "--serve", help="quant: plans an engine runs fast: vllm ties q/k/v and "
                                        "gate/up to one level each, levels 4/8 bits (8: --sym)"),
    sym: Optional[bool] = typer.Option(None, "--sym/--asym", help="quant: symmetric levels"),
    act_order: Optional[bool] = typer.Option(None, "--act-order/--no-act-order", help="quant: GPTQ act-order"),
    mse: Optional[bool] = typer.Option(None, "--mse/--no-mse", help="quant/joint: clipping search"),
    shrink: Optional[float] = typer.Option(None, "--shrink", help="quant/joint: GPTQ Hessian blended with its diagonal"),
    max_sparsity: Optional[float] = typer.Option(None, "--max-sparsity", help="sparsity: highest level"),
    target_bits: Optional[float] = typer.Option(None, "--target-bits"),
    target_sparsity: Optional[float] = typer.Option(None, "--target-sparsity"),
    drop: Optional[int] = typer.Option(None, "--drop", help="depth: sub-blocks to remove"),
    target_mb: Optional[float] = typer.Option(None, "--target-mb", help="total size in MB, everything included"),
    allocator: str = typer.Option("evolutionary", "--allocator", "-a",
                                  help="evolutionary, dp, sensitivity, uniform, owl (sparsity), block-influence (depth)"),
    compare: Optional[str] = typer.Option(None, "--compare", help="also evaluate these allocators, e.g. uniform,dp"),
    generations: Optional[int] = typer.Option(None, "--generations"),
    offspring: Optional[int] = typer.Option(None, "--offspring"),
    survivors: Optional[str] = typer.Option(None, "--survivors", help="kept per selection stage, e.g. 2,1"),
    tokens: Optional[str] = typer.Option(None, "--tokens", help="tokens per selection stage, e.g. 512,4096"),
    init: Optional[str] = typer.Option(None, "--init", help="evolutionary start: best (of the model-free "
                                       "allocators, default), sensitivity (also measured sensitivities), uniform, dp"),
    seed: int = SeedOpt,
    fitness_windows: int = typer.Option(16, "--fitness-windows", help="windows of the calibration source the "
                                        "fitness samples"),
    held_out: bool = typer.Option(True, "--held-out-fitness/--calibration-fitness",
                                  help="fitness and validation windows beyond the calibration windows (default), "
                                       "or the calibration windows themselves"),
    plan: Optional[Path] = typer.Option(None, "--plan", help="apply this plan.json instead of searching"),
    start_from: Optional[list[Path]] = typer.Option(
        None, "--start-from", help="also start the evolutionary search from this plan.json, or (--kind gguf) from "
        "the per-tensor types of this GGUF file of the model, e.g. a llama.cpp preset (repeatable)"),
    db: Optional[Path] = typer.Option(None, "--db", help="level database folder (default: in the cache)"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="checkpoint folder, or FILE.gguf for --kind gguf"),
    export: Optional[str] = typer.Option(None, "--export", help="also write `hf` (a plain dequantized HF folder, OUT-hf) or `compressed-tensors` "
                                               "(packed, for vLLM / transformers, OUT-ct)"),
    evaluate: bool = typer.Option(True, "--eval/--no-eval"), eval_suite: str = EvalSuiteOpt,
    validation_windows: int = typer.Option(4, "--validation-windows",
                                           help="windows after the fitness windows that score each "
                                                "generation's plan; the one scoring best is returned (0 = none)"),
    stream: bool = typer.Option(False, "--stream", help="models larger than memory: decoder blocks stay on disk; "
                                "the database, the fitness and the evaluation bring in one block at a time and the "
                                "checkpoint is written block by block (weight levels: quant, sparsity, joint, lowrank; "
                                "calibration on text, e.g. --data mix)"),
    data: Optional[str] = typer.Option(None, "--data", help=DataOpt.help + "; with --stream the default is mix"),
    n_samples: int = SamplesOpt, seq_len: int = SeqOpt, n_eval: Optional[int] = NEvalOpt,
    device: Optional[str] = DeviceOpt, compute_dtype: str = ComputeOpt, workers: int = WorkersOpt,
    verbose: bool = VerboseOpt,
):
    """Per-unit levels under one exact budget: level database + allocator (EvoPress by default)."""
    _setup(verbose)
    device = _workers(workers, device)
    from ..levels.kinds import KINDS, kind_for_budget
    from ..search import SearchConfig, SearchSettings

    budget = _budget(target_bits, target_mb, target_sparsity, drop)
    export = _export_format(export)
    kind = kind or kind_for_budget(budget.kind)
    given = {"levels": levels, "sparsities": sparsities, "ranks": ranks, "allow-drop": allow_drop,
             "sequential-level": sequential_level, "ratios": ratios, "types": types, "imatrix": imatrix,
             "gptq": gptq_levels, "group-size": group_size,
             "static-groups": static_groups, "serve": serve, "sym": sym, "act-order": act_order, "mse": mse,
             "shrink": shrink, "max-sparsity": max_sparsity}
    ks = KINDS.get(kind).settings_from_options({k: v for k, v in given.items() if v is not None})
    if export == "compressed-tensors":
        from ..export.compressed_tensors import exportable_settings

        ks = exportable_settings(ks, "static-groups" in KINDS.get(kind).options)
    al = {k: v for k, v in dict(generations=generations, offspring=offspring, survivors=_parse_list(survivors),
                                tokens=_parse_list(tokens), init=init).items() if v is not None}
    if allocator == "evolutionary":
        al["seed"] = seed
    elif start_from:
        raise ConfigError(f"--start-from starts the evolutionary allocator, not {allocator}; "
                          "use --allocator evolutionary")
    elif al:
        raise ConfigError("--generations/--offspring/--survivors/--tokens/--init apply to the evolutionary allocator, "
                          f"not {allocator}")
    config = SearchConfig(budget=budget, kind=kind, kind_settings=ks, allocator=allocator, allocator_settings=al,
                          compare=tuple(_parse_list(compare, str) or ()),
                          data=_data_config(data or ("mix" if stream else DEFAULT_CALIBRATION), n_samples, seq_len,
                                            seed, None),
                          fitness=SearchSettings(fitness_windows=fitness_windows,
                                                 validation_windows=validation_windows, held_out=held_out),
                          db=db, out=out, plan_file=plan, start_from=tuple(start_from or ()), evaluate=evaluate,
                          eval_suite=eval_suite,
                          n_eval=N_EVAL if n_eval is None else n_eval, export=export)
    _run_search(model, config, device, stream=stream, compute_dtype=compute_dtype)


@app.command("bitstack")
@command
def bitstack_cmd(
    model: str = typer.Argument(..., help="alias (smollm2-135m), .gguf file, HF folder or hub id"),
    out: Path = typer.Option(..., "--out", "-o", help="BitStack checkpoint folder"),
    blocks: int = typer.Option(8, "--blocks", help="residual blocks per layer (≈1 bit per weight each)"),
    rank: int = typer.Option(4, "--rank", help="rank of each block's magnitude approximation"),
    data: str = DataOpt, n_samples: int = SamplesOpt, seq_len: int = SeqOpt, seed: int = SeedOpt,
    device: Optional[str] = DeviceOpt, compute_dtype: str = ComputeOpt, verbose: bool = VerboseOpt,
):
    """Decompose MODEL once into a BitStack; `modelpress load DIR --max-mb M` then loads any size."""
    _setup(verbose)
    from ..data import get_windows
    from ..export.bitstack import BitStackConfig, build_bitstack, size_range_mb
    from ..models import load_model

    m, tok = load_model(model, device=device)
    windows = get_windows(tok, _data_config(data, n_samples, seq_len, seed, None), model=m)
    manifest = build_bitstack(m, tok, windows, out, BitStackConfig(max_blocks=blocks, rank=rank))
    lo, hi = size_range_mb(manifest)
    console.print(f"BitStack written to {out}: loads at any size from {lo:.1f} to {hi:.1f} MB "
                  f"({len(manifest['order'])} blocks)")


@app.command("load")
@command
def load_cmd(
    path: Path = typer.Argument(..., help="a modelpress checkpoint (BitStack: any size)"),
    max_mb: Optional[float] = typer.Option(None, "--max-mb", help="memory limit for the compressed weights"),
    evaluate: bool = typer.Option(False, "--eval/--no-eval", help="perplexity of the loaded model"),
    reference: Optional[str] = typer.Option(None, "--reference", "-r"),
    export_hf: Optional[Path] = typer.Option(None, "--export-hf", help="write the loaded model as a plain HF folder"),
    dense: bool = typer.Option(False, "--dense", help="decode the compressed layers once (default: they stay packed, "
                               "decoded per forward, in the checkpoint's memory)"),
    eval_suite: str = EvalSuiteOpt, seq_len: int = SeqOpt, n_eval: Optional[int] = NEvalOpt,
    device: Optional[str] = DeviceOpt, compute_dtype: str = ComputeOpt, verbose: bool = VerboseOpt,
):
    """Load a checkpoint under a memory limit; optionally evaluate or export it."""
    _setup(verbose)
    from ..api import open_compressed
    from ..eval.suite import SuiteReference, evaluate_suite, suite_columns, suite_row
    from ..export.hf import export_hf as do_export
    from ..models import load_model

    loaded = open_compressed(path, device=device, max_memory_mb=max_mb, dense=dense)
    m, tok = loaded.model, loaded.tokenizer
    row = {"label": str(path), **loaded.info}
    domains = None
    if evaluate:
        domains = _suite(tok, eval_suite, seq_len, n_eval)
        ref = SuiteReference(load_model(reference, device=device)[0], domains) if reference else None
        row.update(suite_row(evaluate_suite(m, domains, ref), ref.dense if ref else None))
    if export_hf:
        do_export(m, tok, export_hf)
    print_rows([row], [("label", "model"), ("size_mb", "loaded MB"), ("blocks", "blocks"),
                       *(suite_columns(domains.names, ratios=bool(reference)) if domains else [])])


kv_app = typer.Typer(help="Compressed KV caches for generation.", no_args_is_help=True)
app.add_typer(kv_app, name="kv")


def _kv_settings(method, bits, group, window, budget, sinks, rank, outliers, salient, hi_bits, lo_bits, storage,
                 value_bits, value_group, model, tok, data, n_samples, seq_len, seed):
    from ..kvcache import KV_METHODS, fit_bases

    given = dict(bits=bits, group=group, window=window, budget=budget, sinks=sinks, rank=rank, outliers=outliers,
                 salient=salient, hi_bits=hi_bits, lo_bits=lo_bits, storage=storage, value_bits=value_bits,
                 value_group=value_group)
    kw = {k: v for k, v in given.items() if v is not None}
    if method == "channel":
        from ..data import get_windows

        ids = get_windows(tok, _data_config(data, n_samples, seq_len, seed, None)).calib
        kw["bases"] = fit_bases(model, ids)
    return KV_METHODS.build(method, **kw)


def _kv_opts():
    return dict(
        bits=typer.Option(None, "--bits", help="kivi/gear: 2,3,4,8 (16 = unquantized)"),
        group=typer.Option(None, "--group"), window=typer.Option(None, "--window", help="recent tokens kept exact"),
        budget=typer.Option(None, "--budget", help="eviction: tokens kept per head"),
        sinks=typer.Option(None, "--sinks"), rank=typer.Option(None, "--rank", help="gear residual rank / channel rank"),
        outliers=typer.Option(None, "--outliers"), salient=typer.Option(None, "--salient"),
        hi_bits=typer.Option(None, "--hi-bits"), lo_bits=typer.Option(None, "--lo-bits"),
        value_bits=typer.Option(None, "--value-bits", help="kivi/gear: values at their own bit-width"),
        value_group=typer.Option(None, "--value-group", help="kivi/gear: channels per value scale (default: --group)"),
        storage=typer.Option(None, "--storage", help="dtype of entries kept uncompressed (float16, bfloat16; "
                             "default: the model's)"))


_O = _kv_opts()


@kv_app.command("eval")
@command
def kv_eval_cmd(
    model: str = typer.Argument(...),
    method: str = typer.Option(..., "--method", "-m", help="full, kivi, gear, zipcache, streamingllm, h2o, snapkv, ems, channel"),
    bits: Optional[int] = _O["bits"], group: Optional[int] = _O["group"], window: Optional[int] = _O["window"],
    budget: Optional[int] = _O["budget"], sinks: Optional[int] = _O["sinks"], rank: Optional[int] = _O["rank"],
    outliers: Optional[float] = _O["outliers"], salient: Optional[float] = _O["salient"],
    hi_bits: Optional[int] = _O["hi_bits"], lo_bits: Optional[int] = _O["lo_bits"],
    storage: Optional[str] = _O["storage"], value_bits: Optional[int] = _O["value_bits"],
    value_group: Optional[int] = _O["value_group"],
    prefill: int = typer.Option(256, "--prefill", help="tokens processed at once (the prompt)"),
    step: int = typer.Option(1, "--step", help="tokens per decoding step (1 = exactly as in generation)"),
    data: str = KVDataOpt, seq_len: int = typer.Option(1024, "--seq-len"), n_eval: Optional[int] = typer.Option(4, "--n-eval"),
    n_samples: int = typer.Option(8, "--n-samples", help="calibration windows (channel bases)"), seed: int = SeedOpt,
    device: Optional[str] = DeviceOpt, compute_dtype: str = ComputeOpt, verbose: bool = VerboseOpt,
):
    """Perplexity with a compressed cache over long windows, its exact bytes vs the full cache, tokens/s."""
    _setup(verbose)
    from ..data import get_windows
    from ..kvcache import kv_evaluate
    from ..models import load_model

    m, tok = load_model(model, device=device)
    meth = _kv_settings(method, bits, group, window, budget, sinks, rank, outliers, salient, hi_bits, lo_bits,
                        storage, value_bits, value_group, m, tok, data, n_samples, seq_len, seed)
    ids = get_windows(tok, _data_config(data, 1, seq_len, seed, n_eval)).eval
    if prefill >= seq_len:
        raise ConfigError("--prefill must be shorter than --seq-len")
    full = kv_evaluate(m, ids, "full", prefill=prefill, step=step, desc="full cache", storage=storage)
    r = kv_evaluate(m, ids, meth, prefill=prefill, step=step, reference=full["logprobs"], desc=method)
    rows = [{"label": "full cache", "ppl": full["ppl"], "mb": full["cache_bytes"] / 1e6, "ratio": 1.0,
             "tps": full["tokens_per_s"]},
            {"label": meth.label(), "ppl": r["ppl"], "kl": r["kl"], "mb": r["cache_bytes"] / 1e6, "ratio": r["ratio"],
             "tps": r["tokens_per_s"]}]
    print_rows(rows, [("label", "cache"), ("ppl", "ppl"), ("kl", "KL to full"), ("mb", "cache MB"),
                      ("ratio", "compression"), ("tps", "tokens/s")])


@kv_app.command("generate")
@command
def kv_generate_cmd(
    model: str = typer.Argument(...),
    method: str = typer.Option("kivi", "--method", "-m"),
    prompt: str = typer.Option(..., "--prompt", "-p"),
    max_new: int = typer.Option(48, "--max-new"),
    bits: Optional[int] = _O["bits"], group: Optional[int] = _O["group"], window: Optional[int] = _O["window"],
    budget: Optional[int] = _O["budget"], sinks: Optional[int] = _O["sinks"], rank: Optional[int] = _O["rank"],
    outliers: Optional[float] = _O["outliers"], salient: Optional[float] = _O["salient"],
    hi_bits: Optional[int] = _O["hi_bits"], lo_bits: Optional[int] = _O["lo_bits"],
    storage: Optional[str] = _O["storage"], value_bits: Optional[int] = _O["value_bits"],
    value_group: Optional[int] = _O["value_group"],
    data: str = KVDataOpt, seed: int = SeedOpt, device: Optional[str] = DeviceOpt, compute_dtype: str = ComputeOpt,
    verbose: bool = VerboseOpt,
):
    """Greedy generation with a compressed cache, for a quick look."""
    _setup(verbose)
    from ..kvcache import kv_generate
    from ..models import load_model

    m, tok = load_model(model, device=device)
    meth = _kv_settings(method, bits, group, window, budget, sinks, rank, outliers, salient, hi_bits, lo_bits,
                        storage, value_bits, value_group, m, tok, data, 8, 512, seed)
    enc = tok(prompt, return_tensors="pt")
    out, cache = kv_generate(m, enc["input_ids"].to(m.device), meth, attention_mask=enc["attention_mask"].to(m.device),
                             max_new_tokens=max_new)
    console.print(tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    console.print(f"[dim]{meth.label()}: cache {cache.nbytes() / 1e3:.1f} kB vs full {cache.full_nbytes() / 1e3:.1f} kB[/]")


export_app = typer.Typer(help="Write a model in another format.", no_args_is_help=True)
app.add_typer(export_app, name="export")


@export_app.command("gguf")
@command
def export_gguf_cmd(
    src: str = typer.Argument(..., help="a modelpress checkpoint folder or any model load_model accepts"),
    out: Path = typer.Option(..., "--out", "-o", help="the .gguf file to write"),
    type_: str = typer.Option("Q8_0", "--type", help="GGML type for every weight without one (e.g. Q8_0, Q4_K)"),
    preset: Optional[str] = typer.Option(None, "--preset", help="a llama.cpp preset (Q2_K, Q3_K_M, Q4_K_M, Q5_K_M, "
                                         "...): its per-tensor types, quantized by llama.cpp's quantizer"),
    imatrix: bool = typer.Option(False, "--imatrix/--no-imatrix", help="with --preset: weight the quantizer by each "
                                 "layer's importance matrix, collected by llama.cpp's own forward over the "
                                 "calibration text (llama-imatrix, then llama-quantize --imatrix)"),
    data: str = DataOpt, n_samples: int = SamplesOpt, seq_len: int = SeqOpt, seed: int = SeedOpt,
    verbose: bool = VerboseOpt,
):
    """Export to GGUF for llama.cpp (Llama family). Weights already stored as GGML blocks
    (a `--kind gguf` checkpoint) are written as they are; the others are quantized to --type, or
    with --preset to the types llama.cpp's preset gives each tensor."""
    _setup(verbose)
    from ..export.checkpoint import MANIFEST, load_checkpoint
    from ..export.ggufio import export_gguf
    from ..models import load_model
    from ..ops.ggmlweight import GGMLWeight

    if imatrix and not preset:
        raise ConfigError("--imatrix goes with --preset (a search takes it as `search --kind gguf --imatrix`)")
    if (Path(src) / MANIFEST).is_file():
        if preset:
            raise ConfigError("--preset quantizes a float model; give the model, not a compressed checkpoint")
        m, tok, units, _ = load_checkpoint(src)
        weights = {u: w for u, w in units.items() if isinstance(w, GGMLWeight)}
    else:
        m, tok = load_model(src, device="cpu")
        weights = {}
    if preset:
        p = _export_preset(m, tok, out, preset, imatrix, _data_config(data, n_samples, seq_len, seed, None))
    else:
        p = export_gguf(m, out, weights=weights, default_type=type_, tokenizer=tok)
    console.print(f"wrote {p} ({p.stat().st_size / 1e6:.2f} MB)")


@export_app.command("compressed-tensors")
@command
def export_ct_cmd(
    src: Path = typer.Argument(..., help="a modelpress checkpoint folder (integer-quantized layers)"),
    out: Path = typer.Option(..., "--out", "-o", help="the Hugging Face folder to write"),
    verbose: bool = VerboseOpt,
):
    """Export a checkpoint as a compressed-tensors (pack-quantized) folder: vLLM and transformers
    load it with the weights still packed."""
    _setup(verbose)
    from ..export.checkpoint import load_checkpoint, read_manifest
    from ..export.compressed_tensors import export_compressed_tensors

    m, tok, units, _ = load_checkpoint(src)
    info = export_compressed_tensors(m, tok, units, out, dropped=read_manifest(src).get("dropped", []))
    table = Table("bits", "symmetric", "group", "layers", "vLLM kernel (CUDA)", title=f"{src} → {out}")
    for sch in info["schemes"]:
        w = sch["weights"]
        table.add_row(str(w["num_bits"]), str(w["symmetric"]), str(w["group_size"] or "per row"), str(sch["layers"]),
                      sch["vllm"])
    console.print(table)
    console.print(f"left dense: {', '.join(info['ignore']) or 'nothing'}")


def _export_preset(model, tok, out: Path, preset: str, imatrix: bool, data) -> Path:
    """llama.cpp's quantizer makes the preset from a float32 export, given, if asked, the importance
    matrix llama.cpp's own forward collects over `data` (what `llama-imatrix` then
    `llama-quantize --imatrix` make)."""
    import tempfile

    from ..data import get_windows
    from ..export import llamacpp
    from ..export.ggufio import export_gguf

    llamacpp.preset_ftype(preset)  # an unknown preset fails before any work
    with tempfile.TemporaryDirectory(dir=out.parent if out.parent.is_dir() else None) as tmp:
        f32 = export_gguf(model, Path(tmp) / "f32.gguf", default_type="F32", tokenizer=tok)
        im = llamacpp.imatrix(f32, get_windows(tok, data, model=model).calib) if imatrix else None
        return llamacpp.quantize(f32, out, preset, imatrix=im)


@app.command("eval")
@command
def eval_cmd(
    model: str = typer.Argument(..., help="a modelpress checkpoint folder, or any model load_model accepts"),
    reference: Optional[str] = typer.Option(None, "--reference", "-r", help="model to measure KL against"),
    seq_len: int = SeqOpt, n_eval: Optional[int] = NEvalOpt,
    batch_size: Optional[int] = typer.Option(None, "--batch-size"),
    engine: str = typer.Option("torch", "--engine", help="torch, or llama.cpp for a .gguf file"),
    eval_suite: str = EvalSuiteOpt, device: Optional[str] = DeviceOpt, compute_dtype: str = ComputeOpt,
    verbose: bool = VerboseOpt,
):
    """Perplexity on the held-out windows of every evaluation domain (and, with a reference model,
    KL and the ratio to the reference's perplexity per domain, and the worst ratio)."""
    _setup(verbose)
    if engine not in ("torch", "llama.cpp"):
        raise ConfigError("--engine is torch or llama.cpp")
    if engine == "llama.cpp":
        from ..export.llamacpp import perplexity as llama_cpp_perplexity
        from ..models import load_model

        if not model.endswith(".gguf") or not Path(model).is_file():
            raise ConfigError("--engine llama.cpp evaluates a .gguf file")
        _, tok = load_model(model, device="cpu")  # the same tokenizer and windows as the torch engine
        domains = _suite(tok, eval_suite, seq_len, n_eval)
        rows = []
        for d, ids in domains.windows.items():
            r = llama_cpp_perplexity(model, ids)
            rows.append({"label": f"{model} (llama.cpp)", "domain": d, "ppl": r["ppl"], "tokens": r["n_tokens"],
                         "s": r["seconds"]})
        print_rows(rows, [("label", "model"), ("domain", "domain"), ("ppl", "ppl"), ("tokens", "tokens"),
                          ("s", "seconds")])
        return
    from ..api import load_compressed
    from ..eval.suite import SuiteReference, evaluate_suite, suite_columns, suite_row
    from ..export.checkpoint import MANIFEST
    from ..models import load_model

    if (Path(model) / MANIFEST).is_file():
        m, tok = load_compressed(model, device=device, return_tokenizer=True)
    else:
        m, tok = load_model(model, device=device)
    domains = _suite(tok, eval_suite, seq_len, n_eval)
    rows = []
    ref = None
    if reference:
        ref = SuiteReference(load_model(reference, device=device)[0], domains, batch_size=batch_size)
        rows.append({"label": f"{reference} (reference)", **suite_row(ref.dense, ref.dense), "kl": 0.0})
    row = suite_row(evaluate_suite(m, domains, ref, batch_size=batch_size), ref.dense if ref else None)
    rows.append({"label": model, **row})
    print_rows(rows, [("label", "model"), *suite_columns(domains.names, ratios=ref is not None),
                      ("eval_tokens", "tokens")])


@app.command("info")
@command
def info_cmd(path: Path = typer.Argument(..., help="a modelpress checkpoint folder"), verbose: bool = VerboseOpt):
    """Size, effective bits per weight and plan of a checkpoint."""
    _setup(verbose)
    from ..api import info

    i = info(path)
    t = Table(show_header=False, title=str(path))
    for k in ("model_type", "units", "compressed_params", "compressed_mb", "bits_per_weight", "total_params",
              "weights_mb", "bits_per_param", "size_mb"):
        v = i.get(k)
        t.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    t.add_row("method", str(i["plan"].get("label")))
    t.add_row("dropped", ", ".join(i["dropped"]) or "none")
    starved = i["plan"].get("isotropic_experts") or {}
    if starved:  # experts calibration (nearly) never reached: compressed data-free (calib.driver)
        t.add_row("data-free experts", f"{len(starved)}: " + ", ".join(list(starved)[:3]) + (" ..." if len(starved) > 3 else ""))
    console.print(t)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
