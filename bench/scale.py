"""Streamed compression of models larger than memory: peak resident memory against model size.

Random Llama models (hidden 1024, MLP 2816, GQA 16/4 heads; the block count sets the size) are
written as safetensors shards, then GPTQ-compressed (4-bit g128, 16 x 128 calibration tokens)
with `compress --stream` semantics (models.streamed) in a fresh process each. Peak RSS is reported
over the process's fixed overhead: its resident size after the same run on a tiny model (libraries
and code loaded). Loaded whole, the model alone would add its full size. The same models are also
searched streamed (`search` rows: level database, evolutionary search to 3.5 bits/weight and the
plan's checkpoint, all block by block). Rows: bench/results/scale.json.

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
# the streamed budget search (models.synthetic.streamed_search): GPTQ 3/4-bit g128 levels, 3.5 bits/weight
SEARCH = {f"search {k}": v for k, v in SIZES.items()}
SEARCH_SETTINGS = dict(bits="3.5", levels="3,4", generations="4", offspring="4")


def measure(target: float, method: str = "gptq", settings: dict | None = None) -> dict:
    from modelpress.models.synthetic import llama_config, write_random_model

    settings = settings or dict(bits="4", group_size="128")
    with tempfile.TemporaryDirectory() as d:
        cfg = llama_config(target)
        write_random_model(Path(d) / "src", cfg)
        res = subprocess.run([sys.executable, "-m", "modelpress.models.synthetic", str(Path(d) / "src"),
                              str(Path(d) / "ck"), method, *(f"{k}={v}" for k, v in settings.items())],
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
    measure_rows(cache, SEARCH, args, lambda size: measure(size, "search", SEARCH_SETTINGS))
    render(cache.everything())


def render(cache: RowCache) -> None:
    body = ("## Streamed compression: memory against model size (`bench/scale.py`)\n\n"
            "Random Llama models written as safetensors shards (hidden 1024, MLP 2816, the block count sets the "
            "size), each run in a fresh process. Peak RSS is over the process's fixed overhead (its resident size "
            "after the same run on a tiny model). "
            f"Machine: {machine()}.\n\n"
            "### `compress --stream`\n\n"
            "GPTQ 4-bit g128 on 16 x 128 calibration tokens, one decoder block in memory at a time, the checkpoint "
            "written block by block. What grows with the model is the compressed checkpoint's not-yet-written shard "
            "(at most 128 MB) and the embedding; one block, its calibration activations and one layer's solve are the "
            "constant part.\n\n" + _table(cache, SIZES, "compress s")
            + "\n\n### Budget search, streamed (`compress --target-bits --stream`)\n\n"
            f"GPTQ {SEARCH_SETTINGS['levels'].replace(',', '/')}-bit g128 levels (no clipping search) on 16 x 128 "
            f"calibration tokens, built block by block; evolutionary search to {SEARCH_SETTINGS['bits']} bits/weight "
            f"({SEARCH_SETTINGS['generations']} generations x {SEARCH_SETTINGS['offspring']} offspring), every "
            "fitness forward bringing the blocks in one at a time with the candidate's levels; the plan's checkpoint "
            "written block by block. The level database (on disk) and the search are in the time; the database's "
            "cache of packed levels holds at most 256 MB.\n\n" + _table(cache, SEARCH, "database + search + write s"))
    write_section("scale", body)


def _table(cache: RowCache, keys: dict, seconds: str) -> str:
    rows = []
    for key in keys:
        r = cache.get(key)
        if r:
            rows.append({"size": key.removeprefix("search "), "blocks": r["blocks"], "model_mb": r["model_bytes"] / 1e6,
                         "peak_mb": r["peak_over_fixed"] / 1e6, "frac": r["peak_over_fixed"] / r["model_bytes"],
                         "fixed_mb": r["fixed_bytes"] / 1e6, "checkpoint_mb": r["checkpoint_mb"],
                         "seconds": r["seconds"]})
    cols = [("size", "model"), ("blocks", "blocks"), ("model_mb", "weights MB (float32)"),
            ("peak_mb", "peak RSS over fixed MB"), ("frac", "peak / model size"), ("fixed_mb", "fixed overhead MB"),
            ("checkpoint_mb", "checkpoint MB"), ("seconds", seconds)]
    return print_table(rows, cols)


if __name__ == "__main__":
    main()
