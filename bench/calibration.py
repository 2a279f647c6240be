"""Calibration source x windows x operator on smollm2-135m, scored on every evaluation domain.

Each row compresses the model once (GPTQ 4/3-bit g64, SparseGPT 50%, defaults otherwise) with
calibration windows from one source (`pydoc`, `mix`, `self`, `mix+self`; see modelpress/data),
then measures perplexity on the held-out windows of every domain of the default suite (pydoc,
austen, chitchat) against the dense model on the same windows. `worst × dense` is the largest
perplexity ratio over the domains. The operator-settings rows vary one setting of GPTQ-3 /
SparseGPT-50 at the default source. Rows are cached (bench/results/calibration.json): an
interrupted run resumes, `--only SUBSTRING` runs a subset, rows run in the order listed.

    python bench/calibration.py [--only SUBSTRING] [--force] [--n-eval 16] [--render]
"""
from __future__ import annotations

import copy
import gc
import json
import time

from common import bench_args, RowCache, machine, not_run_note, print_table, write_section

import modelpress as mp
from modelpress.data.suites import SUITES, suite_windows
from modelpress.eval.suite import SuiteReference, evaluate_suite, suite_row
from modelpress.utils.device import active_compute_dtype

# Every operator at its library defaults (GPTQ: act-order, clipping search, Hessian shrink 0.1;
# SparseGPT: 30 refit steps); the settings rows change one of them.
OPS = {
    "gptq w4 g64": ("gptq", dict(bits=4, group_size=64)),
    "gptq w3 g64": ("gptq", dict(bits=3, group_size=64)),
    "sparsegpt 50%": ("sparsegpt", dict(sparsity=0.5)),
}
SOURCES = ("pydoc", "self", "mix", "mix+self", "prose+self", "mix+prose+self")
DEFAULT_SOURCE = "mix+self"  # the library default (DataConfig / CLI); the settings rows use it


def rows() -> list[tuple[str, str, int, str, dict]]:
    """(key, source, windows, method, settings) in the order they run: the sources at 128 windows,
    then other window counts, then one setting changed at the default source."""
    out = []
    first = [("gptq w3 g64", SOURCES), ("sparsegpt 50%", SOURCES), ("gptq w4 g64", SOURCES[:4])]
    for op, sources in first:
        out += [(f"{op} | {src} | 128", src, 128, *OPS[op]) for src in sources]
    for n in (32, 512):
        for op in ("gptq w3 g64", "sparsegpt 50%"):
            out += [(f"{op} | {src} | {n}", src, n, *OPS[op]) for src in ("pydoc", DEFAULT_SOURCE)]
    settings = [
        ("gptq w3 g64 shrink 0", "gptq", dict(bits=3, group_size=64, shrink=0.0)),
        ("gptq w3 g64 damp 0.1", "gptq", dict(bits=3, group_size=64, damp=0.1)),
        ("gptq w3 g64 no mse", "gptq", dict(bits=3, group_size=64, mse=False)),
        ("gptq w3 g64 clip by activations", "gptq", dict(bits=3, group_size=64, clip_by="activations")),
        ("gptq w3 g64 no act-order", "gptq", dict(bits=3, group_size=64, act_order=False)),
        ("sparsegpt 50% no refit", "sparsegpt", dict(sparsity=0.5, refit_iters=0)),
        ("sparsegpt 50% refit 100", "sparsegpt", dict(sparsity=0.5, refit_iters=100)),
        ("sparsegpt 50% shrink 0.1", "sparsegpt", dict(sparsity=0.5, shrink=0.1)),
        ("sparsegpt 50% damp 0.1", "sparsegpt", dict(sparsity=0.5, damp=0.1)),
    ]
    out += [(f"{label} | {DEFAULT_SOURCE} | 128", DEFAULT_SOURCE, 128, method, kw) for label, method, kw in settings]
    return out


def main() -> None:
    args = bench_args(__doc__)
    cache = RowCache("calibration", force=args.force)
    if not args.render:
        todo = [r for r in rows() if (not args.only or args.only in r[0]) and not cache.get(r[0])]
        if todo:
            run(todo, cache, args.n_eval)
    render(cache.everything())


def run(todo, cache: RowCache, n_eval: int) -> None:
    base, tok = mp.load_model("smollm2-135m", device="cpu")
    domains = suite_windows(tok, SUITES["default"], seq_len=512, n_eval=n_eval)
    t = time.time()
    ref = SuiteReference(base, domains)
    dense = suite_row(ref.dense)
    cache.put("dense", {**dense, "domains": domains.names, "skipped": domains.skipped,
                        "compute_dtype": str(active_compute_dtype("cpu")).removeprefix("torch."),
                        "seconds": time.time() - t})
    for key, src, n, method, kw in todo:
        print(f"== {key}", flush=True)
        t0 = time.time()
        windows = mp.get_windows(tok, mp.DataConfig(corpus=src, n_samples=n, seq_len=512), model=base)
        t_data = time.time() - t0
        model = copy.deepcopy(base)
        t1 = time.time()
        mp.compress(model, tok, method, data=windows, **kw)
        t_comp = time.time() - t1
        res = evaluate_suite(model, domains, ref)
        row = {"key": key, "source": src, "windows": n, "method": method, "settings": kw,
               **suite_row(res, ref.dense), "data_s": t_data, "compress_s": t_comp}
        cache.put(key, row)
        print(json.dumps(row), flush=True)
        del model
        gc.collect()


COLUMNS_HEAD = [("op", "operator"), ("source", "calibration"), ("windows", "windows")]


def render(cache: RowCache) -> None:
    dense = cache.get("dense")
    domains = dense["domains"] if dense else list(SUITES["default"])
    unseen = [d for d in domains if d != "pydoc"]
    cols = COLUMNS_HEAD + [(f"ratio:{d}", f"{d} × dense") for d in domains] + [
        ("worst_ratio", "worst × dense"), ("worst_unseen", "worst of " + "/".join(unseen)), ("kl", "KL to dense"),
        ("compress_s", "compress s")]
    table = []
    if dense:
        table.append({"op": "dense", **{f"ratio:{d}": 1.0 for d in domains}, "worst_ratio": 1.0, "kl": 0.0,
                      **{f"ppl:{d}": dense[f"ppl:{d}"] for d in domains}})
    for key, *_ in rows():
        r = cache.get(key)
        if r:
            table.append({**r, "op": key.split(" | ")[0],
                          "worst_unseen": max((r[f"ratio:{d}"] for d in unseen), default=None)})
    md = print_table(table, cols)
    missing = [k for k, *_ in rows() if not cache.get(k)]
    ppl = ", ".join(f"{d} {dense[f'ppl:{d}']:.3f}" for d in domains) if dense else "not measured"
    body = (
        "## Calibration source × windows × operator (`bench/calibration.py`)\n\n"
        f"smollm2-135m ({dense.get('compute_dtype', 'float32') if dense else '?'} forwards). Each row calibrates "
        "on one source — `pydoc` (the Python manual), `self` (text sampled from the model, temperature 1, from "
        "BOS or a chat user turn), `mix` (half pydoc, half State of the Union addresses), `prose` (a third each "
        "of State of the Union addresses, Wikipedia article summaries and Moby-Dick), and their `+` joins in "
        "equal shares (`mix+self` is the default) — and is scored on "
        f"{dense['eval_tokens'] // max(1, len(domains)) if dense else '?'} held-out tokens of each evaluation domain "
        f"({', '.join(domains)}); none of austen or chitchat is in any calibration source. Cells are perplexity "
        f"over the dense model's on the same windows (dense perplexity: {ppl}); worst = the largest ratio. "
        "Operators at their defaults (GPTQ: act-order, clipping search, Hessian blended with its diagonal "
        "(1−s)·H + s·diag H at s = 0.1; SparseGPT: 30 conjugate-gradient refit steps on the final mask); "
        "settings rows change one setting at the default source, mix+self. "
        + not_run_note(missing, "calibration.py")
        + f"Machine: {machine()}.\n\n" + md)
    write_section("calibration", body)


if __name__ == "__main__":
    main()
