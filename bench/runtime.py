"""The packed runtime on smollm2-135m: resident memory and speed of a loaded checkpoint.

A 4-bit and a 3-bit checkpoint (RTN g64: the runtime's cost does not depend on how the codes were
chosen) and a mixed one (the cpu preset's GPTQ 2/3/4-bit level database at 3.5 bits/weight, dp
plan) are loaded with `load_compressed` packed (default), packed with float16 for the rest of the
model, on torch's int4 kernel, and dense (`dense=True`), each in a fresh process: resident memory
after loading (RSS minus the process's RSS before it), prefill of 1 x 512 tokens, greedy decode of
32 tokens with the KV cache, perplexity on 2 held-out windows of each evaluation domain (float32
forwards); the dense float32 model is the reference. Rows: bench/results/runtime.json.

    python bench/runtime.py [--force] [--render]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, RowCache, machine, print_table, write_section

ROWS = {
    "dense float32 model": dict(ck=None),
    "4-bit, packed": dict(ck=4),
    "4-bit, packed, rest in float16": dict(ck=4, dtype="float16"),
    "4-bit, packed, int4 kernel (bfloat16 activations)": dict(ck=4, kernel="int4"),
    "4-bit, dense (decoded once)": dict(ck=4, dense=True),
    "3-bit, packed": dict(ck=3),
    "3-bit, dense (decoded once)": dict(ck=3, dense=True),
    "mixed 2/3/4-bit (3.5 bits/weight), packed": dict(ck="mixed"),
    "mixed 2/3/4-bit (3.5 bits/weight), packed, int4 kernel for its 4-bit layers": dict(ck="mixed", kernel="int4"),
    "mixed 2/3/4-bit (3.5 bits/weight), dense (decoded once)": dict(ck="mixed", dense=True),
}
N_PPL = 2  # held-out windows per domain for the perplexity columns (the packed path is slow to run)

CHILD = r"""
import json, sys, time
import torch
sys.path.insert(0, {root!r})
import modelpress as mp
from modelpress.utils.memory import peak_rss_bytes, rss_bytes as rss
from modelpress.models import load_model
before = rss()
spec = json.loads({spec!r})
dtype = getattr(torch, spec.get("dtype", "float32"))
if spec["ck"] is None:
    model, tok = load_model("smollm2-135m", device="cpu")
else:
    model, tok = mp.load_compressed(spec["path"], dense=spec.get("dense", False), dtype=dtype, kernel=spec.get("kernel"),
                                    return_tokenizer=True)
loaded = rss() - before
seen, tensor_bytes = set(), 0
for t in list(model.parameters()) + list(model.buffers()):
    if t.data_ptr() not in seen:
        seen.add(t.data_ptr()); tensor_bytes += t.numel() * t.element_size()
ids = torch.randint(0, 49152, (1, 512), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    model(input_ids=ids[:, :64])
    t = time.perf_counter(); out = model(input_ids=ids, use_cache=True); prefill = time.perf_counter() - t
    past = out.past_key_values; nxt = out.logits[:, -1:].argmax(-1)
    t = time.perf_counter()
    for _ in range(32):
        out = model(input_ids=nxt, past_key_values=past, use_cache=True)
        past = out.past_key_values; nxt = out.logits[:, -1:].argmax(-1)
    decode = time.perf_counter() - t
after = rss() - before
ppl = mp.evaluate_domains(model, tok, n_eval={n_ppl}, compute_dtype="float32")
print(json.dumps({{"tensor_mb": tensor_bytes / 1e6, "resident_mb": loaded / 1e6, "resident_after_mb": after / 1e6, "prefill_tok_s": 512 / prefill, "decode_tok_s": 32 / decode,
                  "peak_rss_mb": peak_rss_bytes() / 1e6, **{{k: v for k, v in ppl.items() if k.startswith("ppl:")}}}}))
"""


def make_checkpoints(d: Path, which: set) -> dict:
    import modelpress as mp
    from modelpress.allocate.budget import Budget
    from modelpress.presets import budget_config
    from modelpress.search import allocate, materialize, open_database
    from modelpress.utils.io import dir_size

    out = {}
    for ck in which - {None}:
        m, tok = mp.load_model("smollm2-135m", device="cpu")
        if ck == "mixed":  # the cpu preset's database (cached by bench/search.py's 3.5-bit run)
            cfg = budget_config(Budget("bits", 3.5), machine="cpu")
            db = open_database(m, tok, cfg.kind, data=cfg.data, **cfg.kind_settings)
            res = allocate(m, db, cfg.budget, "dp")
            c = materialize(m, tok, db, res.plan)
        else:
            c = mp.compress(m, tok, "rtn", bits=ck, group_size=64)
        c.save(d / f"w{ck}")
        out[ck] = (d / f"w{ck}", dir_size(d / f"w{ck}") / 1e6)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--render", action="store_true")
    args = ap.parse_args()
    cache = RowCache("runtime", force=args.force)
    todo = [k for k in ROWS if not cache.get(k)] if not args.render else []
    if todo:
        with tempfile.TemporaryDirectory() as d:
            cks = make_checkpoints(Path(d), {ROWS[k]["ck"] for k in todo})
            for key in todo:
                spec = dict(ROWS[key])
                if spec["ck"] is not None:
                    spec["path"], spec["checkpoint_mb"] = str(cks[spec["ck"]][0]), cks[spec["ck"]][1]
                code = CHILD.format(root=str(ROOT), spec=json.dumps(spec), n_ppl=N_PPL)
                res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
                row = {**json.loads(res.stdout.strip().splitlines()[-1]), "checkpoint_mb": spec.get("checkpoint_mb")}
                print(key, row, flush=True)
                cache.put(key, row)
    render(cache.everything())


def render(cache: RowCache) -> None:
    table = [{"row": k, **cache.get(k)} for k in ROWS if cache.get(k)]
    domains = [k.removeprefix("ppl:") for k in (table[0] if table else {}) if k.startswith("ppl:")]
    cols = [("row", "model"), ("checkpoint_mb", "checkpoint MB"), ("tensor_mb", "model tensors MB"),
            ("resident_mb", "resident MB after load"),
            ("resident_after_mb", "resident MB after the runs"),
            ("prefill_tok_s", "prefill tok/s (1 x 512)"), ("decode_tok_s", "decode tok/s (32 tokens)")] + [
        (f"ppl:{d}", f"ppl {d}") for d in domains]
    md = print_table(table, cols)
    body = ("## Packed runtime (`bench/runtime.py`)\n\n"
            "smollm2-135m checkpoints (RTN g64, and a mixed plan: the cpu preset's GPTQ 2/3/4-bit g64 levels at 3.5 "
            "bits/weight, dp) loaded with `load_compressed`: packed (the default: compressed "
            "layers keep their stored tensors, decoded per forward), packed with the rest of the model in float16, "
            "packed on torch's CPU int4 matmul (`kernel=\"int4\"`: bfloat16 activations, outputs within bfloat16 "
            "rounding), and dense (`dense=True`, decoded once into float32 Linear weights); each measured in a fresh process: "
            "resident memory after loading and after the runs (RSS growth over the process before loading; the dense "
            "model's safetensors are memory-mapped, so its pages count once touched), prefill of one 512-token window, greedy decode of 32 "
            f"tokens with the KV cache, perplexity on {N_PPL} held-out windows of each domain (float32 forwards); "
            "model tensors = the bytes of its parameters and buffers (the weights it "
            "holds; resident memory adds the libraries and the allocator's slack). Logits of packed and dense loads are identical (tests/ops/"
            f"test_packed_linear.py). Machine: {machine()}.\n\n" + md)
    write_section("runtime", body)


if __name__ == "__main__":
    main()
