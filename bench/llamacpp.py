"""GGUF for llama.cpp: llama.cpp's presets, without and with an importance matrix, against searched
mixes of the same file size, all scored by llama.cpp itself on every evaluation domain.

Rows per preset size:
- `llama.cpp PRESET`: llama.cpp's quantizer (llama_model_quantize) on the float32 GGUF export;
- `llama.cpp PRESET + imatrix`: the same per-tensor types, each matrix quantized by llama.cpp's
  quantizer (ggml_quantize_chunk) with the importance matrix (mean x² per input column) that
  llama.cpp's own forward over the float32 export collects on the calibration windows
  (`llamacpp.imatrix`: what `llama-imatrix` collects, through the same eval callback), as
  `llama-quantize --imatrix` does;
- `searched mix`: the evolutionary search over GGML types per tensor (`--kind gguf`, the cpu
  preset) with the preset's file size as the budget, plain levels; `searched mix, activation-aware
  levels`: the same over three quantizers per type (`--imatrix --gptq`: llama.cpp's plain and
  importance-weighted ones, and GPTQ on each type's grid). Both start from the best, on a fitness
  sample, of uniform, dp and the preset's own per-tensor types (`--start-from PRESET.gguf`).
Perplexity and KL to the float32 export are computed by llama.cpp on held-out windows of each
domain; tokens/s is llama.cpp's greedy decoding, all files measured back to back at the end.
Rows are cached in bench/results/gguf-domains[-fair].json; an interrupted run resumes.

    python bench/llamacpp.py [--model smollm2-135m|fair] [--only Q4_K_M] [--searches Q3_K_M,Q4_K_M] [--force] [--render]

`--model fair`: smollm2-135m fine-tuned off the Q4_1 grid it ships on (bench/fair_source.py).
"""
from __future__ import annotations

import copy
import gc
import json
import time
from pathlib import Path

import torch

from common import SCRATCH, RowCache, bench_args, machine, not_run_note, print_table, write_section

import modelpress as mp
from modelpress.allocate.budget import Budget
from modelpress.data.suites import SUITES, suite_windows
from modelpress.export import llamacpp
from modelpress.export.ggufio import export_gguf, export_gguf_types, gguf_names
from modelpress.levels.kinds.gguf import plan_for_types, types_of_file
from modelpress.presets import preset_search
from modelpress.search import allocate, materialize, open_database

PRESETS = ["Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M", "Q5_K_M"]
SEARCH_FIRST = ["Q3_K_M", "Q4_K_M", "Q2_K", "Q3_K_S", "Q4_K_S", "Q5_K_M"]  # most informative searches first
DOMAINS = SUITES["default"]
MODELS = {"smollm2-135m": ("gguf", "gguf-domains", SCRATCH / "gguf"),  # section, row cache, work folder
          "fair": ("gguf_fair", "gguf-domains-fair", SCRATCH / "gguf-fair")}
WORK = SCRATCH / "gguf"
COLUMNS = [("label", "file"), ("size_mb", "size MB"), *[(f"ppl:{d}", f"ppl {d}") for d in DOMAINS],
           ("worst_ratio", "worst × F32"), ("kl", "KL to F32"), ("tok_s", "tokens/s"), ("search_s", "search s")]


def measure(path: Path, domains, f32: Path | None) -> dict:
    row = {"size_mb": path.stat().st_size / 1e6}
    kl, n = 0.0, 0
    for d, ids in domains.windows.items():
        r = llamacpp.perplexity(path, ids, reference=f32)
        row[f"ppl:{d}"] = r["ppl"]
        if f32 is not None:
            kl += r["kl"] * r["n_tokens"]
            n += r["n_tokens"]
    row["n_tokens"] = sum(ids.numel() - ids.shape[0] for ids in domains.windows.values())
    if f32 is not None:
        row["kl"] = kl / n
    return row


def main() -> None:
    global WORK
    def extra(ap):
        ap.add_argument("--model", default="smollm2-135m", choices=sorted(MODELS))
        ap.add_argument("--searches", default=",".join(SEARCH_FIRST), help="preset sizes to search a mix at")

    args = bench_args(__doc__, n_eval=8, extra=extra)
    section, cache_name, WORK = MODELS[args.model]
    cache = RowCache(cache_name, force=args.force)
    if args.render:
        render(cache.everything(), args.model)
        return
    WORK.mkdir(parents=True, exist_ok=True)
    if args.model == "fair":
        from fair_source import derive

        source = derive()
        cache.put("source", json.loads((source / "finetune.json").read_text()))
        base, tok = mp.load_model(str(source), device="cpu")
    else:
        base, tok = mp.load_model("smollm2-135m", device="cpu")
    shared = preset_search("cpu")
    windows = mp.get_windows(tok, shared["data"], model=base)
    domains = suite_windows(tok, DOMAINS, seq_len=512, n_eval=args.n_eval)
    f32 = WORK / "f32.gguf"
    if not f32.is_file():
        export_gguf(base, f32, default_type="F32", tokenizer=tok)
    if not cache.get("f32"):
        cache.put("f32", dict(measure(f32, domains, None), label="F32 export (reference)", machine=machine(),
                              data=shared["data"].corpus, n_samples=shared["data"].n_samples, n_eval=args.n_eval))
    im = None
    for preset in PRESETS:
        if args.only and args.only != preset:
            continue
        out = WORK / f"{preset}.gguf"
        if not cache.get(f"preset|{preset}"):
            print("== preset", preset, flush=True)
            llamacpp.quantize(f32, out, preset)
            cache.put(f"preset|{preset}", dict(measure(out, domains, f32), label=f"llama.cpp {preset}"))
        if not cache.get(f"imatrix|{preset}"):
            print("== preset + imatrix", preset, flush=True)
            if im is None:
                unit = {g: u for u, g in gguf_names(base).items()}
                im = {unit[n]: torch.from_numpy(v) for n, v in llamacpp.imatrix(f32, windows.calib).items()}
            if not out.is_file():
                llamacpp.quantize(f32, out, preset)
            mine = export_gguf_types(base, WORK / f"{preset}-imatrix.gguf", llamacpp.tensor_types(out), imatrix=im,
                                     tokenizer=tok)
            cache.put(f"imatrix|{preset}", dict(measure(mine, domains, f32), label=f"llama.cpp {preset} + imatrix"))
    for preset in [p for p in SEARCH_FIRST if p in args.searches.split(",")]:
        if args.only and args.only != preset:
            continue
        for quantizers, settings in (("plain", {}), ("aware", {"imatrix": True, "gptq": True})):
            key = f"search|{quantizers}|{preset}"
            if cache.get(key):
                continue
            print("==", key, flush=True)
            db = open_database(base, tok, "gguf", data=windows, db=WORK / f"db-{quantizers}", **settings)
            model = copy.deepcopy(base)
            t = time.time()
            if not (WORK / f"{preset}.gguf").is_file():
                llamacpp.quantize(f32, WORK / f"{preset}.gguf", preset)
            starts = {f"llama.cpp {preset}": plan_for_types(db, types_of_file(base, WORK / f"{preset}.gguf"))}
            res = allocate(model, db, Budget("mb", cache.get(f"preset|{preset}")["size_mb"]), shared["allocator"],
                           data=windows, settings=shared["fitness"], **shared["allocator_settings"],
                           checkpoint=str(WORK / f"search-{quantizers}-{preset}.json"), starts=starts)
            secs = time.time() - t
            out = WORK / f"searched-{quantizers}-{preset}.gguf"
            export_gguf(model, out, weights=materialize(model, tok, db, res.plan).units, tokenizer=tok)
            types: dict[str, int] = {}
            for v in res.plan.levels.values():
                types[v] = types.get(v, 0) + 1
            label = "searched mix" + (", activation-aware levels" if quantizers == "aware" else "")
            cache.put(key, dict(measure(out, domains, f32), label=f"{label} @ {preset} size", search_s=secs,
                                types=types, generations=shared["allocator_settings"]["generations"],
                                start=res.fitness_stats["start"],
                                start_validation=res.fitness_stats["start_validation"],
                                final_validation=res.fitness_stats["final_validation"]))
            del model
            gc.collect()
    speed_pass(cache, tok)
    render(cache.everything(), args.model)


def files(preset: str) -> dict[str, Path]:
    return {f"preset|{preset}": WORK / f"{preset}.gguf", f"imatrix|{preset}": WORK / f"{preset}-imatrix.gguf",
            f"search|plain|{preset}": WORK / f"searched-plain-{preset}.gguf",
            f"search|aware|{preset}": WORK / f"searched-aware-{preset}.gguf"}


def speed_pass(cache: RowCache, tok, rounds: int = 3) -> None:
    """Every file's decode speed measured back to back (best of `rounds`), so all rows see the same machine load."""
    prompt = mp.get_windows(tok, mp.DataConfig(corpus="pydoc", n_samples=4, seq_len=512, n_eval=1)).eval[0, :64].tolist()
    paths = {"f32": WORK / "f32.gguf"}
    for p in PRESETS:
        paths.update(files(p))
    for key, path in paths.items():
        if cache.get(key) and path.is_file():
            best = max(llamacpp.generate(path, prompt, n_new=64)["tokens_per_s"] for _ in range(rounds))
            cache.put(key, dict(cache.get(key), tok_s=best))


def target_line(cache: RowCache, ref: dict | None) -> str:
    """The issue's target, read off the rows: at every preset size the activation-aware searched mix has
    lower worst-domain perplexity ratio and lower KL than every imatrix preset of equal or larger size."""
    if not ref:
        return ""

    def worst(r):
        return max(r[f"ppl:{d}"] / ref[f"ppl:{d}"] for d in DOMAINS)

    out = []
    for p in PRESETS:
        s = cache.get(f"search|aware|{p}")
        if not s:
            continue
        rivals = [cache.get(f"imatrix|{q}") for q in PRESETS if cache.get(f"imatrix|{q}")
                  and cache.get(f"imatrix|{q}")["size_mb"] >= s["size_mb"] - 1e-9
                  and cache.get(f"imatrix|{q}")["size_mb"] <= cache.get(f"preset|{p}")["size_mb"] + 1e-9]
        lost = [r["label"] for r in rivals if not (worst(s) < worst(r) and s["kl"] < r["kl"])]
        out.append(f"{p}: " + ("beats " + ", ".join(r["label"] for r in rivals) if not lost else
                               "**does not beat** " + ", ".join(lost)))
    return ("Target (activation-aware searched mix below every imatrix preset of its size in worst ratio and KL): "
            + "; ".join(out) + ".") if out else ""


def render(cache: RowCache, model: str) -> None:
    ref = cache.get("f32")
    rows = [ref] if ref else []
    for preset in PRESETS:
        for key in files(preset):
            r = cache.get(key)
            if r and ref:
                rows.append(dict(r, worst_ratio=max(r[f"ppl:{d}"] / ref[f"ppl:{d}"] for d in DOMAINS)))
    md = print_table(rows, COLUMNS)
    missing = [k for p in PRESETS for k in files(p) if not cache.get(k)]
    target = target_line(cache, ref)
    mixes = "; ".join(f"{r['label']}: " + ", ".join(f"{t} x{n}" for t, n in sorted(r["types"].items()))
                      for k, r in cache.rows.items() if k.startswith("search|"))
    searched = [r for k, r in cache.rows.items() if k.startswith("search|")]
    starts = "; ".join(f"{r['label']}: {r['start']} (validation KL {r['start_validation']:.4f} → "
                       f"{r['final_validation']:.4f})" for k, r in cache.rows.items()
                       if k.startswith("search|") and r.get("start"))
    gens = next((r["generations"] for k, r in cache.rows.items() if k.startswith("search|")), "?")
    src = cache.get("source")
    what = ("smollm2-135m (the Q4_1-source case: the model ships as a Q4_1 GGUF, see the caveat)" if model != "fair"
            else "a source on no GGML grid: smollm2-135m fine-tuned (bench/fair_source.py" + (
                f": {src['steps']} AdamW steps, lr {src['lr']}, {src['batch']} x {src['seq_len']} tokens of `wiki` per "
                f"step, float32 weights; Q4_1 round-to-nearest error / Q4_0's = {src['q4_1_over_q4_0']:.2f}, 0 for the "
                "shipped model" if src else "") + ")")
    body = (
        f"## GGUF for llama.cpp (`bench/llamacpp.py{' --model fair' if model == 'fair' else ''}`)\n\n"
        f"{what}, every file scored by "
        "llama.cpp 0.5.0 itself (the prebuilt CPU libraries of `@node-llama-cpp/linux-x64` 3.22.1, loaded by "
        "`modelpress.export.llamacpp`). Presets: llama.cpp's quantizer on the float32 GGUF export, no importance "
        "matrix; `+ imatrix`: the preset's own per-tensor types, each matrix quantized by llama.cpp's quantizer "
        "with the importance matrix (mean x² per input column) of the calibration windows, which is what "
        "`llama-quantize --imatrix` does with it (without one, the same path reproduces llama.cpp's preset files "
        "byte for byte, tests/export/test_llamacpp.py); the importance matrix is llama.cpp's: its own forward over "
        "the float32 export, watched through its eval callback as `llama-imatrix` watches it "
        "(`llamacpp.imatrix`; the activation-aware levels below take theirs from the calibration runner's torch "
        "pass, the same definition). Searched mix: the evolutionary search over GGML types per tensor "
        f"(Q2_K … Q8_0, embedding included; K-quants only where rows are multiples of 256), cpu preset ({gens} "
        "generations, KL fitness on held-out calibration windows), budget = the preset's file size; "
        "`activation-aware levels` searches over three quantizers per type (`--imatrix --gptq`: llama.cpp's "
        "plain and importance-weighted quantizers, and GPTQ on each type's grid — the K-quants' scales from "
        "llama.cpp's quantizer with the importance matrix — whose codes llama.cpp decodes exactly but cannot make). "
        + ("Every search starts from the best, on one fitness sample, of uniform, dp and the preset's own per-tensor "
           "types (`--start-from PRESET.gguf`, mapped to each type's most accurate level in the database); "
           "`Starts` below says which won. " if searched and all(r.get("start") for r in searched) else
           "Searches listed under `Starts` below started from the best, on one fitness sample, of uniform, dp and "
           "the preset's own per-tensor types (`--start-from PRESET.gguf`); the others from the best of the model-free "
           "allocators' plans. " if any(r.get("start") for r in searched) else "")
        + "Calibration: "
        + (f"{ref['n_samples']} x 512 tokens of `{ref['data']}`. Evaluation: {ref['n_eval']} held-out windows of "
           f"512 tokens from each of {', '.join(DOMAINS)} ({ref['n_tokens']} scored tokens); " if ref else "")
        + "worst × F32 = the largest perplexity ratio to the float32 export over the domains; KL to F32 = mean "
        "per-token KL(F32 ‖ file) over all domains, both from llama.cpp's logits. tokens/s = llama.cpp greedy "
        "decoding of 64 tokens after a 64-token prompt, best of 3, all files back to back at the end. Most of "
        "smollm2's matrices are 576 wide, not a multiple of 256, so llama.cpp's K-quant presets fall back to "
        "other types on most tensors (its quantizer says so). "
        + not_run_note(missing, "llamacpp.py" + (" --model fair" if model == "fair" else ""))
        + f"Machine: {(ref or {}).get('machine') or machine()}.\n\n" + md
        + (f"\n\nTypes chosen per tensor by the searches: {mixes}." if mixes else "")
        + (f"\n\nStarts (the search's validation KL of its start → of the plan it returned): {starts}."
           if starts else "")
        + (f"\n\n{target}" if target else "")
        + ("\n\n**Caveat.** The default model's weights are exactly representable in Q4_1: the level database "
           "measures zero error for plain Q4_1 on every matrix, so a search can keep the original grid, while "
           "llama.cpp's presets requantize to K-types and lose accuracy. The `gguf_fair` section below is the fair "
           "comparison.\n" if model != "fair" else "\n")
    )
    write_section(MODELS[model][0], body)


if __name__ == "__main__":
    main()
