"""The packed runtime on smollm2-135m: resident memory and speed of a loaded checkpoint.

A 4-bit and a 3-bit checkpoint (RTN g64: the runtime's cost does not depend on how the codes were
chosen) are loaded with `load_compressed` packed (default), packed with float16 for the rest of
the model, and dense (`dense=True`), each in a fresh process: resident memory after loading (RSS
minus the process's RSS before it), prefill of 1 x 512 tokens, greedy decode of 32 tokens with the
KV cache; the dense float32 model is the reference. Rows: bench/results/runtime.json.

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
}

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
    model = mp.load_compressed(spec["path"], dense=spec.get("dense", False), dtype=dtype, kernel=spec.get("kernel"))
    tok = None
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
print(json.dumps({{"tensor_mb": tensor_bytes / 1e6, "resident_mb": loaded / 1e6, "resident_after_mb": after / 1e6, "prefill_tok_s": 512 / prefill, "decode_tok_s": 32 / decode,
                  "peak_rss_mb": peak_rss_bytes() / 1e6}}))
"""


def make_checkpoints(d: Path) -> dict[int, Path]:
    import modelpress as mp
    from modelpress.utils.io import dir_size

    out = {}
    for bits in (4, 3):
        m, tok = mp.load_model("smollm2-135m", device="cpu")
        mp.compress(m, tok, "rtn", bits=bits, group_size=64).save(d / f"w{bits}")
        out[bits] = (d / f"w{bits}", dir_size(d / f"w{bits}") / 1e6)
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
            cks = make_checkpoints(Path(d))
            for key in todo:
                spec = dict(ROWS[key])
                if spec["ck"] is not None:
                    spec["path"], spec["checkpoint_mb"] = str(cks[spec["ck"]][0]), cks[spec["ck"]][1]
                code = CHILD.format(root=str(ROOT), spec=json.dumps(spec))
                res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
                row = {**json.loads(res.stdout.strip().splitlines()[-1]), "checkpoint_mb": spec.get("checkpoint_mb")}
                print(key, row, flush=True)
                cache.put(key, row)
    render(cache.everything())


def render(cache: RowCache) -> None:
    table = [{"row": k, **cache.get(k)} for k in ROWS if cache.get(k)]
    cols = [("row", "model"), ("checkpoint_mb", "checkpoint MB"), ("tensor_mb", "model tensors MB"),
            ("resident_mb", "resident MB after load"),
            ("resident_after_mb", "resident MB after the runs"),
            ("prefill_tok_s", "prefill tok/s (1 x 512)"), ("decode_tok_s", "decode tok/s (32 tokens)")]
    md = print_table(table, cols)
    body = ("## Packed runtime (`bench/runtime.py`)\n\n"
            "smollm2-135m checkpoints (RTN g64) loaded with `load_compressed`: packed (the default: compressed "
            "layers keep their stored tensors, decoded per forward), packed with the rest of the model in float16, "
            "packed on torch's CPU int4 matmul (`kernel=\"int4\"`: bfloat16 activations, outputs within bfloat16 "
            "rounding), and dense (`dense=True`, decoded once into float32 Linear weights); each measured in a fresh process: "
            "resident memory after loading and after the runs (RSS growth over the process before loading; the dense "
            "model's safetensors are memory-mapped, so its pages count once touched), prefill of one 512-token window, greedy decode of 32 "
            "tokens with the KV cache; model tensors = the bytes of its parameters and buffers (the weights it "
            "holds; resident memory adds the libraries and the allocator's slack). Logits of packed and dense loads are identical (tests/ops/"
            f"test_packed_linear.py). Machine: {machine()}.\n\n" + md)
    write_section("runtime", body)


if __name__ == "__main__":
    main()
