"""Uniform compression of smollm2-135m with every operator; writes a table into docs/benchmarks.md.

Same calibration (128 x 512 tokens of the default source, `mix+self`) and evaluation windows (16 x
512 held-out tokens of each default domain: pydoc, austen, chitchat) for every row. Perplexity per
domain, the worst ratio to dense, KL to dense, real checkpoint size, effective bits, compression
wall time (calibrate + compress + save). Rows are cached in bench/results/uniform-domains.json so
an interrupted run resumes; `--force` recomputes, `--only gptq` runs a subset.

    python bench/uniform.py [--only SUBSTRING] [--force]
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import sys
import tempfile
import time
from pathlib import Path


from common import not_run_note, RowCache, machine, print_table, write_section

import modelpress as mp
from modelpress.data.suites import SUITES, suite_windows
from modelpress.eval.suite import SuiteReference, evaluate_suite, suite_row
from modelpress.utils.device import forward_dtype_name

ROWS = [("dense", None, {}, 0)]
ROWS += [(f"rtn w{b} g64", "rtn", dict(bits=b, group_size=64), 0) for b in (4, 3, 2)]
ROWS += [(f"gptq w{b} g64", "gptq", dict(bits=b, group_size=64), 0) for b in (4, 3, 2)]
ROWS += [(f"gptq w{b} g64 no-mse", "gptq", dict(bits=b, group_size=64, mse=False), 0) for b in (4, 3)]
for m in ("magnitude", "wanda", "sparsegpt"):
    ROWS += [(f"{m} {int(s * 100)}%", m, dict(sparsity=s), 0) for s in (0.5, 0.6, 0.7)]
    ROWS += [(f"{m} 2:4", m, dict(pattern="2:4"), 0)]
ROWS += [(f"drop {n} sub-blocks", None, {}, n) for n in (2, 4, 8)]
ROWS += [("sparsegpt 50% no refit", "sparsegpt", dict(sparsity=0.5, refit_iters=0), 0)]

DOMAINS = SUITES["default"]
COLUMNS = [("label", "method"), *[(f"ppl:{d}", f"ppl {d}") for d in DOMAINS], ("worst_ratio", "worst × dense"),
           ("kl", "KL to dense"), ("size_mb", "size MB"), ("bits_per_weight", "bits/weight (layers)"),
           ("bits_per_param", "bits/param (file)"), ("seconds", "compress s")]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default=None)
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--time-cli", action="store_true",
                    help="time `modelpress compress smollm2-135m --method gptq --bits 4` end to end (run it on an idle machine)")
    args = ap.parse_args()
    cache = RowCache("uniform-domains", force=args.force)
    if args.time_cli:
        cache.put("cli gptq w4 timing", time_cli())
        cache.put("cli gptq w4 no-mse timing", time_cli(["--no-mse"]))
        render(cache.everything())
        return
    base, tok = mp.load_model("smollm2-135m", device="cpu")
    windows = mp.get_windows(tok, mp.DataConfig(n_samples=128, seq_len=512), model=base)
    domains = suite_windows(tok, DOMAINS, seq_len=512, n_eval=16)
    ref = None
    for label, method, kw, drop in ROWS:
        if args.only and args.only not in label:
            continue
        if cache.get(label):
            continue
        if ref is None:
            ref = SuiteReference(base, domains)
        print(f"== {label}", flush=True)
        model = copy.deepcopy(base)
        t0 = time.time()
        with tempfile.TemporaryDirectory() as tmp:
            if method is None and not drop:
                row = {"size_mb": sum(p.numel() for p in model.parameters()) * 2 / 1e6, "bits_per_param": 16.0,
                       "seconds": 0.0}
            else:
                c = mp.compress(model, tok, method, data=windows, drop=drop, **kw)
                c.save(Path(tmp) / "ck")
                info = mp.info(Path(tmp) / "ck")
                row = {"size_mb": info["weights_mb"], "bits_per_weight": info["bits_per_weight"],
                       "bits_per_param": info["bits_per_param"], "seconds": time.time() - t0,
                       "dropped": c.dropped}
        row.update(label=label, calibration=windows.config.corpus, compute=forward_dtype_name(base), machine=machine(),
                   **suite_row(evaluate_suite(model, domains, ref), ref.dense))
        cache.put(label, row)
        print(json.dumps(row), flush=True)
        del model
        gc.collect()
    render(cache.everything())


def time_cli(extra: list[str] = ()) -> dict:
    """Wall time of the whole CLI job a user runs: load, calibrate (128 x 512), GPTQ 4-bit g64, save."""
    import subprocess

    cmd = [str(Path(sys.executable).with_name("modelpress")), "compress", "smollm2-135m", "--method", "gptq",
           "--bits", "4", "--group-size", "64", "--no-eval", *extra]
    with tempfile.TemporaryDirectory() as tmp:
        t = time.time()
        subprocess.run(cmd + ["--out", str(Path(tmp) / "ck")], check=True, capture_output=True)
        return {"wall_s": time.time() - t, "command": " ".join(cmd[1:])}


def render(cache: RowCache) -> None:
    rows = []
    for label, *_ in ROWS:
        r = cache.get(label)
        if r is not None:
            rows.append(r)
    md = print_table(rows, COLUMNS)
    missing = [label for label, *_ in ROWS if not cache.get(label)]
    first = rows[0] if rows else {}
    body = (
        "## Uniform compression (`bench/uniform.py`)\n\n"
        f"smollm2-135m (SmolLM2-135M-Instruct, {first.get('compute', 'float32')} forwards), calibration 128 x 512 tokens of "
        f"`{first.get('calibration', 'mix+self')}`; evaluation {first.get('eval_tokens', '?')} held-out tokens, "
        f"16 windows of 512 from each of {', '.join(DOMAINS)}; worst = the largest perplexity ratio to dense. "
        "Size = weights file on disk (embeddings and norms in float16). bits/weight counts codes, scales, zeros, "
        "masks and permutations of the compressed Linear layers; bits/param divides the whole weights file by all "
        "134.5M parameters. compress s = calibrate + compress + save on the machine below (eval excluded). "
        "`gptq w* g64` rows run GPTQ as it runs by default (act-order, the per-group clipping search, the Hessian "
        "blended with its diagonal, shrink 0.1); the "
        "`no-mse` rows without the clipping search. The `sparsegpt` rows refit the kept weights on the final mask "
        "(30 conjugate-gradient steps, the default); `sparsegpt 50% no refit` is the plain OBS sweep. "
        + timing_note(cache.get("cli gptq w4 timing"), cache.get("cli gptq w4 no-mse timing"))
        + not_run_note(missing, "uniform.py")
        + f"Machine: {first.get('machine') or machine()}.\n\n" + md
    )
    write_section("uniform", body)


def timing_note(t: dict | None, no_mse: dict | None = None) -> str:
    if not t:
        return "The end-to-end CLI timing has not been measured (`python bench/uniform.py --time-cli`). "
    out = (f"End to end, `modelpress {t['command']}` (load, calibrate, quantize, save; GPTQ's default clipping "
           f"search on) took **{t['wall_s']:.0f} s** with nothing else running")
    if no_mse:
        out += f"; with `--no-mse`, **{no_mse['wall_s']:.0f} s** ({no_mse.get('date', 'same machine')})"
    return out + ". "


if __name__ == "__main__":
    main()
