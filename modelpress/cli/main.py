"""`modelpress` command line: a thin shell over the Python API.

Errors a user can cause print one line (no traceback) and exit with status 2.
"""
from __future__ import annotations

import copy
import functools
import logging
import re
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from ..errors import ConfigError, ModelpressError
from ..utils.progress import enable_progress

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Compress neural networks to a budget.")
console = Console()
err_console = Console(stderr=True)


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
    enable_progress(sys.stderr.isatty() or verbose)


def command(fn):
    """Run a command, turning modelpress errors into one clean line."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
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


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", s).strip("-").lower()


def _data_config(data: str, n_samples: int, seq_len: int, seed: int, n_eval: Optional[int]):
    from ..data import DataConfig

    return DataConfig(corpus=data, n_samples=n_samples, seq_len=seq_len, seed=seed, n_eval=n_eval)


DataOpt = typer.Option("pydoc", "--data", help="corpus: pydoc, wikitext2, c4, or a .txt file/folder")
SamplesOpt = typer.Option(128, "--n-samples", help="calibration windows")
SeqOpt = typer.Option(512, "--seq-len", help="tokens per window")
SeedOpt = typer.Option(0, "--seed")
NEvalOpt = typer.Option(None, "--n-eval", help="cap on evaluation windows (default: all held-out windows)")
DeviceOpt = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
VerboseOpt = typer.Option(False, "--verbose", "-v")


@app.command("compress")
@command
def compress_cmd(
    model: str = typer.Argument(..., help="alias (smollm2-135m), .gguf file, HF folder or hub id"),
    method: Optional[str] = typer.Option(None, "--method", "-m", help="gptq, rtn, sparsegpt, wanda, magnitude"),
    bits: Optional[int] = typer.Option(None, "--bits", help="2..8"),
    group_size: Optional[int] = typer.Option(None, "--group-size", help="quantization group (0 = per row)"),
    sym: Optional[bool] = typer.Option(None, "--sym/--asym"),
    act_order: Optional[bool] = typer.Option(None, "--act-order/--no-act-order"),
    mse: Optional[bool] = typer.Option(None, "--mse/--no-mse", help="clipping search for quantization ranges"),
    sparsity: Optional[float] = typer.Option(None, "--sparsity", help="unstructured sparsity 0..0.95"),
    pattern: Optional[str] = typer.Option(None, "--pattern", help="N:M sparsity, e.g. 2:4"),
    drop: int = typer.Option(0, "--drop", help="remove this many attention/MLP sub-blocks (lowest influence)"),
    sequential: bool = typer.Option(True, "--sequential/--no-sequential",
                                    help="feed compressed blocks' outputs to the next block"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="checkpoint folder (default out/MODEL-METHOD)"),
    export: Optional[str] = typer.Option(None, "--export", help="also write `hf`: a plain dequantized HF folder"),
    evaluate: bool = typer.Option(True, "--eval/--no-eval", help="perplexity and KL before/after"),
    data: str = DataOpt, n_samples: int = SamplesOpt, seq_len: int = SeqOpt, seed: int = SeedOpt,
    n_eval: Optional[int] = NEvalOpt, device: Optional[str] = DeviceOpt, verbose: bool = VerboseOpt,
):
    """Compress every Linear of MODEL's decoder blocks with one method; save, evaluate, report."""
    _setup(verbose)
    from .. import api
    from ..data import get_windows
    from ..eval import evaluate as run_eval
    from ..models import load_model
    from ..report import REPORT_COLUMNS, write_report

    if export not in (None, "hf"):
        raise ConfigError(f"unknown export format {export!r}; use --export hf (GGUF: `modelpress export gguf`)")
    kw = {k: v for k, v in dict(bits=bits, sym=sym, act_order=act_order, mse=mse, sparsity=sparsity,
                                pattern=pattern).items() if v is not None}
    if group_size is not None:
        kw["group_size"] = group_size or None
    if method is None:
        method = "gptq" if bits is not None or not (sparsity or pattern or drop) else ("sparsegpt" if (sparsity or pattern) else None)
        if method == "gptq" and "bits" not in kw:
            kw["bits"] = 4
    op = api.make_operator(method, **kw) if method else None
    label = (op.label() if op else "dense") + (f" drop{drop}" if drop else "")
    out = out or Path("out") / _slug(f"{Path(model).stem}-{label}")

    t0 = time.time()
    m, tok = load_model(model, device=device)
    windows = get_windows(tok, _data_config(data, n_samples, seq_len, seed, n_eval))
    rows = []
    ref = None
    if evaluate:
        ref = copy.deepcopy(m)
        r = run_eval(ref, windows.eval, desc="eval dense")
        rows.append({"label": "dense", "ppl": r.ppl, "kl": 0.0,
                     "size_mb": sum(p.numel() for p in m.parameters()) * 2 / 1e6, "bits_per_param": 16.0})
    c = api.compress(m, tok, op, data=windows, drop=drop, sequential=sequential, device=device)
    c.save(out, export_hf_dir=(out.with_name(out.name + "-hf") if export == "hf" else None))
    info = api.info(out)
    row = {"label": label, "size_mb": info["size_mb"], "bits_per_weight": info["bits_per_weight"],
           "bits_per_param": info["bits_per_param"], "seconds": time.time() - t0}
    if evaluate:
        r = run_eval(m, windows.eval, reference=ref, desc="eval compressed")
        row.update(ppl=r.ppl, kl=r.kl)
    rows.append(row)
    report = {"model": model, "method": c.plan["method"], "budget": label, "data": c.plan["data"],
              "checkpoint": info, "rows": rows, "compress_seconds": c.seconds}
    write_report(out, report)
    print_rows(rows, REPORT_COLUMNS, title=f"{model} → {out}")
    if export == "hf":
        console.print(f"plain HF folder: {out.with_name(out.name + '-hf')}")


@app.command("eval")
@command
def eval_cmd(
    model: str = typer.Argument(..., help="a modelpress checkpoint folder, or any model load_model accepts"),
    reference: Optional[str] = typer.Option(None, "--reference", "-r", help="model to measure KL against"),
    data: str = DataOpt, seq_len: int = SeqOpt, n_eval: Optional[int] = NEvalOpt,
    batch_size: Optional[int] = typer.Option(None, "--batch-size"),
    device: Optional[str] = DeviceOpt, verbose: bool = VerboseOpt,
):
    """Perplexity on the held-out windows (and KL to a reference model)."""
    _setup(verbose)
    from ..api import load_compressed
    from ..data import get_windows
    from ..eval import evaluate as run_eval
    from ..export.checkpoint import MANIFEST
    from ..models import load_model

    if (Path(model) / MANIFEST).is_file():
        m, tok = load_compressed(model, device=device, return_tokenizer=True)
    else:
        m, tok = load_model(model, device=device)
    ref = load_model(reference, device=device)[0] if reference else None
    windows = get_windows(tok, _data_config(data, 1, seq_len, 0, n_eval))
    r = run_eval(m, windows.eval, reference=ref, batch_size=batch_size)
    print_rows([{"label": model, "ppl": r.ppl, "kl": r.kl, "tokens": r.n_tokens}],
               [("label", "model"), ("ppl", "ppl"), ("kl", "KL to reference"), ("tokens", "tokens")])


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
    console.print(t)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
