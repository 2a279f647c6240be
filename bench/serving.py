"""compressed-tensors export on smollm2-135m: what transformers loads is the model modelpress made.

Each row compresses the model with GPTQ (4-bit g64, act-order with static groups: the groups the
format stores), evaluates it in modelpress, exports it with `--export compressed-tensors`, loads the
folder with transformers (AutoModelForCausalLM.from_pretrained, compressed-tensors installed) and
evaluates that on the same windows; also the export's size on disk against the dense float16
model and the modelpress checkpoint, and the vLLM kernel its scheme gets. Rows are cached
(bench/results/serving.json).

    python bench/serving.py [--only SUBSTRING] [--force] [--n-eval 16] [--render]
"""
from __future__ import annotations

import copy
import gc
import json
import tempfile
import time
from pathlib import Path

import torch
from common import bench_args, RowCache, machine, not_run_note, print_table, write_section

import modelpress as mp
from modelpress.allocate.budget import Budget
from modelpress.data.suites import SUITES, suite_windows
from modelpress.eval.suite import SuiteReference, evaluate_suite, suite_row
from modelpress.search import allocate, materialize, open_database
from modelpress.utils.device import compute_dtype
from modelpress.utils.io import dir_size

N_SAMPLES = 64  # calibration windows (mix+self); 64 to keep the CPU run short
ROWS = {
    "gptq w4 g64 asym, static groups": dict(bits=4, group_size=64, sym=False, static_groups=True),
    "gptq w4 g64 sym, static groups": dict(bits=4, group_size=64, sym=True, static_groups=True),
    "gptq w4 g64 asym, act-order groups (not exportable)": dict(bits=4, group_size=64, sym=False),
    # a mixed plan: the `--serve vllm` level database (GPTQ 4/8-bit g64 sym, static groups, q/k/v and
    # gate/up tied) at 4.5 bits/weight, allocated by dp (what `search --serve vllm --allocator dp` makes)
    "mixed 4/8-bit g64 sym, static groups (serve vllm, dp plan at 4.5 bits/weight)": dict(
        plan=dict(bits=4.5, allocator="dp"), sym=True),
}
# the `--serve vllm` levels of bench/serve_search.py
MIXED_LEVELS = dict(levels=(4, 8), group_size=64, sym=True, static_groups=True, sequential_level=4, serve="vllm")


def main() -> None:
    args = bench_args(__doc__)
    cache = RowCache("serving", force=args.force)
    if not args.render:
        todo = [k for k in ROWS if (not args.only or args.only in k) and not cache.get(k)]
        if todo:
            with compute_dtype("float32"):
                run(todo, cache, args.n_eval)
    render(cache.everything())


def _load_hf(path: Path, sym: bool):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    # transformers 5.24 + compressed-tensors 0.20.1 load an asymmetric folder only with dequantize=True
    kw = {} if sym else {"quantization_config": CompressedTensorsConfig(dequantize=True)}
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw).eval()


def run(todo: list[str], cache: RowCache, n_eval: int) -> None:
    base, tok = mp.load_model("smollm2-135m", device="cpu")
    domains = suite_windows(tok, SUITES["default"], seq_len=512, n_eval=n_eval)
    ref = SuiteReference(base, domains)
    windows = mp.get_windows(tok, mp.DataConfig(n_samples=N_SAMPLES, seq_len=512), model=base)
    with tempfile.TemporaryDirectory() as d:
        dense_dir = Path(d) / "dense"
        mp.api.export_hf(base, tok, dense_dir)
        cache.put("dense", {**suite_row(ref.dense), "domains": domains.names,
                            "disk_mb": (dense_dir / "model.safetensors").stat().st_size / 1e6})
    for key in todo:
        kw = ROWS[key]
        print(f"== {key}", flush=True)
        model = copy.deepcopy(base)
        t0 = time.time()
        if "plan" in kw:
            db = open_database(model, tok, "quant", data=windows, **MIXED_LEVELS)
            res = allocate(model, db, Budget("bits", kw["plan"]["bits"]), kw["plan"]["allocator"])
            c = materialize(model, tok, db, res.plan)
            bits = {}
            for level in res.plan.levels.values():
                bits[level] = bits.get(level, 0) + 1
            extra = {"levels_used": bits}
        else:
            c = mp.compress(model, tok, "gptq", data=windows, **kw)
            extra = {}
        row = {"key": key, **extra, "compress_s": time.time() - t0, "modelpress": suite_row(evaluate_suite(model, domains, ref),
                                                                                   ref.dense)}
        with tempfile.TemporaryDirectory() as d:
            ck, ct = Path(d) / "ck", Path(d) / "ck-ct"
            c.save(ck)
            row["checkpoint_mb"] = dir_size(ck) / 1e6
            try:
                c.export("compressed-tensors", ct)
            except mp.ModelpressError as e:
                row["export_error"] = str(e).split(";")[0]
            else:
                cfg = json.loads((ct / "config.json").read_text())["quantization_config"]
                from modelpress.export.compressed_tensors import vllm_kernel

                kernels = {f"{g['weights']['num_bits']}-bit": vllm_kernel(g["weights"])
                           for g in cfg["config_groups"].values()}
                w = cfg["config_groups"]["group_0"]["weights"]
                row.update(export_mb=(ct / "model.safetensors").stat().st_size / 1e6, format=cfg["format"],
                           vllm="; ".join(f"{b}: {k}" for b, k in kernels.items()) if len(kernels) > 1
                           else vllm_kernel(w), vllm_cpu=vllm_kernel(w, "cpu"))
                hf = _load_hf(ct, kw["sym"])
                row["transformers"] = suite_row(evaluate_suite(hf, domains, ref), ref.dense)
                ids = domains.windows[domains.names[0]][:1]
                with torch.no_grad():
                    row["max_logit_diff"] = float((hf(input_ids=ids).logits - model(input_ids=ids).logits).abs().max())
                del hf
        cache.put(key, row)
        print(json.dumps(row), flush=True)
        del model, c
        gc.collect()


def render(cache: RowCache) -> None:
    dense = cache.get("dense")
    domains = dense["domains"] if dense else list(SUITES["default"])
    table = []
    for key in ROWS:
        r = cache.get(key)
        if not r:
            continue
        for who in ("modelpress", "transformers"):
            if who not in r:
                continue
            table.append({"row": key, "loaded by": who if who == "modelpress" else "transformers (from the export)",
                          **r[who], "disk": r["checkpoint_mb"] if who == "modelpress" else r.get("export_mb"),
                          "vllm": r.get("vllm", r.get("export_error", "")) if who != "modelpress" else "",
                          "diff": r.get("max_logit_diff") if who != "modelpress" else None})
        if "export_error" in r:
            table.append({"row": key, "loaded by": "export refused", "vllm": r["export_error"]})
    cols = [("row", "GPTQ"), ("loaded by", "loaded by")] + [(f"ppl:{d}", f"ppl {d}") for d in domains] + [
        ("worst_ratio", "worst × dense"), ("disk", "MB on disk"), ("diff", "max |Δ logit|"),
        ("vllm", "vLLM kernel (CUDA)")]
    md = print_table(table, cols)
    missing = [k for k in ROWS if not cache.get(k)]
    body = ("## compressed-tensors export (`bench/serving.py`)\n\n"
            f"smollm2-135m, GPTQ 4-bit g64 on {N_SAMPLES} x 512 tokens of mix+self (float32 compute); the mixed row is "
            "a plan over GPTQ 4/8-bit g64 sym levels (static groups, q/k/v and gate/up tied: `--serve vllm`) at 4.5 "
            "bits/weight, chosen by dp. Each row: "
            "the model in modelpress, then its `--export compressed-tensors` folder loaded by transformers "
            "(AutoModelForCausalLM.from_pretrained with compressed-tensors installed; asymmetric folders with "
            "CompressedTensorsConfig(dequantize=True), see docs/serving.md) and evaluated on the same windows. "
            "MB on disk: the modelpress checkpoint folder, or the export's model.safetensors (float16 embeddings "
            "and norms included)"
            + (f"; the dense float16 model is {dense['disk_mb']:.1f} MB" if dense else "")
            + ". max |Δ logit|: transformers vs modelpress on one 512-token window. vLLM kernel: the one vLLM 0.33 "
            "selects for the scheme (read from its source; not run here). "
            + not_run_note(missing, "serving.py") + f"Machine: {machine()}.\n\n" + md)
    write_section("serving", body)


if __name__ == "__main__":
    main()
