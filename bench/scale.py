"""Streamed compression of models larger than memory: peak resident memory against model size.

Random Llama models (hidden 1024, MLP 2816, GQA 16/4 heads; the block count sets the size) are
written as safetensors shards, then GPTQ-compressed (4-bit g128, 16 x 128 calibration tokens)
with `compress --stream` semantics (models.streamed) in a fresh process each. Peak RSS is reported
over the process's fixed overhead: its resident size after the same run on a tiny model (libraries
and code loaded). Loaded whole, the model alone would add its full size. Rows:
bench/results/scale.json.

    python bench/scale.py [--force] [--render]
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, RowCache, bench_args, machine, measure_rows, print_table, write_section

SIZES = {"0.5 GB": 0.5e9, "1 GB": 1.0e9, "2 GB": 2.0e9}


def measure(target: float) -> dict:
    from modelpress.models.synthetic import llama_config, write_random_model

    with tempfile.TemporaryDirectory() as d:
        cfg = llama_config(target)
        write_random_model(Path(d) / "src", cfg)
        res = subprocess.run([sys.executable, "-m", "modelpress.models.synthetic", str(Path(d) / "src"),
                              str(Path(d) / "ck"), "gptq", "bits=4", "group_size=128"],
                             capture_output=True, text=True, check=True, cwd=ROOT)
        row = json.loads(res.stdout.strip().splitlines()[-1])
        from modelpress.export.checkpoint import checkpoint_info

        row["checkpoint_mb"] = checkpoint_info(Path(d) / "ck")["size_mb"]
    row["blocks"] = cfg.num_hidden_layers
    return row


def main() -> None:
    args = bench_args(__doc__)
    cache = RowCache("scale", force=args.force)
    measure_rows(cache, SIZES, args, measure)
    render(cache.everything())


def render(cache: RowCache) -> None:
    rows = []
    for key in SIZES:
        r = cache.get(key)
        if r:
            rows.append({"size": key, "blocks": r["blocks"], "model_mb": r["model_bytes"] / 1e6,
                         "peak_mb": r["peak_over_fixed"] / 1e6, "frac": r["peak_over_fixed"] / r["model_bytes"],
                         "fixed_mb": r["fixed_bytes"] / 1e6, "checkpoint_mb": r["checkpoint_mb"],
                         "seconds": r["seconds"]})
    cols = [("size", "model"), ("blocks", "blocks"), ("model_mb", "weights MB (float32)"),
            ("peak_mb", "peak RSS over fixed MB"), ("frac", "peak / model size"), ("fixed_mb", "fixed overhead MB"),
            ("checkpoint_mb", "checkpoint MB"), ("seconds", "compress s")]
    md = print_table(rows, cols)
    body = ("## Streamed compression: memory against model size (`bench/scale.py`)\n\n"
            "Random Llama models written as safetensors shards (hidden 1024, MLP 2816, the block count sets the "
            "size), GPTQ 4-bit g128 on 16 x 128 calibration tokens, compressed streamed (`compress --stream`: one "
            "decoder block in memory at a time, the checkpoint written block by block), each in a fresh process. "
            "Peak RSS is over the process's fixed overhead (its resident size after the same run on a tiny model). "
            "What grows with the model is the compressed checkpoint's not-yet-written shard (at most 128 MB) and the "
            "embedding; one block, its calibration activations and one layer's solve are the constant part. "
            f"Machine: {machine()}.\n\n" + md)
    write_section("scale", body)


if __name__ == "__main__":
    main()
