"""Random Llama models of a chosen size, written to disk shard by shard (never whole in memory):
the stand-ins for models too large to download here, for measuring memory and time at scale."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from .safetensors_source import INDEX


def llama_config(target_bytes: float, *, hidden: int = 1024, intermediate: int = 2816, heads: int = 16,
                 kv_heads: int = 4, vocab: int = 4096, bytes_per_param: int = 4):
    """A Llama config whose weights take about `target_bytes` (the block count is what grows)."""
    from transformers import LlamaConfig

    head_dim = hidden // heads
    per_block = 2 * hidden * hidden + 2 * hidden * kv_heads * head_dim + 3 * hidden * intermediate + 2 * hidden
    layers = max(1, round((target_bytes / bytes_per_param - vocab * hidden) / per_block))
    return LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                       tie_word_embeddings=True, max_position_embeddings=2048)


@torch.no_grad()
def write_random_model(folder: str | Path, config, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> int:
    """Write a random model of `config` as one safetensors shard per decoder block (plus one for
    the rest) with its index and config, building one block at a time. Returns the bytes written."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    shapes = {k: tuple(v.shape) for k, v in skeleton.state_dict().items() if k != "lm_head.weight"}
    gen = torch.Generator().manual_seed(seed)
    groups: dict[str, list[str]] = {}
    for k in shapes:
        parts = k.split(".")
        key = f"block{int(parts[2]):05d}" if parts[:2] == ["model", "layers"] else "rest"
        groups.setdefault(key, []).append(k)
    weight_map, total = {}, 0
    for g, names in groups.items():
        tensors = {}
        for k in names:
            shape = shapes[k]
            if len(shape) == 1:  # norms
                tensors[k] = torch.ones(shape, dtype=dtype)
            else:
                std = 0.02 if "embed" in k else shape[1] ** -0.5
                tensors[k] = (torch.randn(shape, generator=gen) * std).to(dtype)
            total += tensors[k].numel() * tensors[k].element_size()
        fname = f"model-{g}.safetensors"
        save_file(tensors, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in names})
        del tensors
    (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    config.save_pretrained(str(folder))
    return total


def measure_streamed_compress(src: str | Path, out: str | Path, *, method: str = "gptq", n_samples: int = 16,
                              seq_len: int = 128, **settings) -> dict:
    """Peak resident memory of compressing the model folder `src` streamed (models.streamed) into
    `out`, over the process's fixed overhead: the resident size after the same run on a tiny model
    of the same kind (libraries and code paths loaded, nothing of the big model). Meant to run in a
    fresh process (`python -m modelpress.models.synthetic SRC OUT`): the peak is the process's.

    `method="search"`: a budget search instead — GPTQ level database (`levels`, `group_size`, on the
    inputs of the `bits`-bit model), evolutionary search to `bits` bits/weight (`generations` x
    `offspring`, fitness on the calibration windows), the plan's checkpoint written to `out`."""
    import tempfile
    import time

    from ..api import compress
    from ..data.windows import DataConfig, Windows
    from ..utils.memory import peak_rss_bytes, release_freed_memory, rss_bytes
    from .streamed import open_streamed

    def run(folder, dest) -> int:
        sm = open_streamed(folder)
        ids = torch.randint(0, sm.model.config.vocab_size, (n_samples, seq_len),
                            generator=torch.Generator().manual_seed(0))
        w = Windows(calib=ids, eval=ids[:1], calib_starts=[], eval_starts=[], config=DataConfig())
        if method == "search":
            streamed_search(sm.model, w, Path(dest), **settings)
        else:
            compress(sm.model, sm.tokenizer, method, data=w, out=dest, **settings)
        return sm.nbytes()

    with tempfile.TemporaryDirectory() as tmp:
        write_random_model(f"{tmp}/warm", llama_config(2e6, hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=256))
        run(f"{tmp}/warm", f"{tmp}/warm-out")
    release_freed_memory()
    base = rss_bytes()
    t0 = time.time()
    size = run(src, out)
    return {"model_bytes": size, "fixed_bytes": base, "peak_bytes": peak_rss_bytes(),
            "peak_over_fixed": peak_rss_bytes() - base, "seconds": time.time() - t0}


def streamed_search(model, windows, out: Path, *, bits: float = 3.0, levels: str = "2,3,4", group_size: int = 128,
                    generations: int = 4, offspring: int = 4) -> None:
    """The search `measure_streamed_compress(method="search")` runs (its database beside `out`)."""
    from ..allocate.budget import Budget
    from ..search import SearchSettings, allocate, materialize, open_database

    bits = float(bits)
    lv = tuple(int(b) for b in str(levels).split(","))
    db = open_database(model, None, "quant", data=windows, db=out.with_name(out.name + "-db"), levels=lv,
                       group_size=group_size, mse=False, sequential_level=min(lv, key=lambda b: abs(b - bits)))
    res = allocate(model, db, Budget("bits", bits), "evolutionary", data=windows,
                   settings=SearchSettings(fitness_windows=len(windows.calib), validation_windows=0),
                   generations=generations, offspring=offspring, tokens=(windows.calib.shape[1] * 2,),
                   survivors=(1,))
    materialize(model, None, db, res.plan, out=out)


if __name__ == "__main__":  # python -m modelpress.models.synthetic SRC OUT [method] [key=value ...]
    import sys

    args = sys.argv[1:]
    kw = {}
    for a in args[3:]:
        k, v = a.split("=", 1)
        kw[k] = {"true": True, "false": False}.get(v.lower(), int(v) if v.lstrip("-").isdigit() else v)
    print(json.dumps(measure_streamed_compress(args[0], args[1], method=args[2] if len(args) > 2 else "gptq", **kw)))
