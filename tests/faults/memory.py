"""Peak resident memory of a job over the process's fixed overhead, against the model's size.

`python -m tests.faults.memory JOB MODEL [N_SAMPLES SEQ_LEN]` runs JOB (compress: GPTQ 4-bit g64;
database: the GPTQ 2/3/4-bit level database; search: the database plus a short evolutionary
search) on MODEL in this fresh process and prints one JSON line: the model's float bytes, the
fixed overhead (resident size after the same job on a tiny model: libraries and code paths
loaded), the peak over it, and one block's activations for the calibration windows:
n_samples x seq_len x (2 x hidden + 3 x intermediate) x 4 bytes, the block's input and normed
input and its MLP's gate, up and their product — what the one-pass sequential calibration holds
while every window waits at a layer for that layer's statistics. The ceilings the tests and
docs/reliability.md state: peak over fixed <= CEILING[job] x model + those activations. compress
holds the model and its packed layers; a database build also keeps the dense weights to put back
(one more model); a search keeps every level of every unit decoded for its forwards and the
packed levels besides, after its database build in the same process (levels + 3 models, here
2/3/4 bits).
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch


CEILING = {"compress": 2.0, "database": 3.0, "search": 6.0}  # x the float model's bytes


def activation_bytes(config, n_samples: int, seq_len: int) -> int:
    inter = getattr(config, "intermediate_size", None) or 4 * config.hidden_size
    return n_samples * seq_len * (2 * config.hidden_size + 3 * inter) * 4


def run_job(job: str, model, tok, n_samples: int, seq_len: int, work: Path) -> None:
    import modelpress as mp
    from modelpress.allocate.budget import Budget
    from modelpress.data import DataConfig, Windows
    from modelpress.search import SearchSettings, allocate, open_database

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (n_samples + 6, seq_len), generator=g)
    w = Windows(ids[:n_samples], ids[n_samples:], [], [], DataConfig(n_samples=n_samples, seq_len=seq_len))
    if job == "compress":
        mp.compress(model, tok, "gptq", data=w, bits=4, group_size=64).save(work / "ck")
        return
    db = open_database(model, tok, "quant", data=w, db=work / "db", levels=(2, 3, 4), group_size=64)
    if job == "search":
        allocate(model, db, Budget("bits", 3.0), "evolutionary", data=w,
                 settings=SearchSettings(fitness_windows=4, validation_windows=2), generations=2, offspring=4,
                 tokens=(seq_len, 2 * seq_len), survivors=(2, 1), init="uniform")


def measure(job: str, name: str, n_samples: int = 16, seq_len: int = 128) -> dict:
    from modelpress.models import load_model
    from modelpress.utils.memory import peak_rss_bytes, release_freed_memory, rss_bytes
    from tests.conftest import tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        run_job(job, tiny_model("llama"), None, 4, 32, Path(tmp))
    release_freed_memory()
    fixed = rss_bytes()
    t0 = time.time()
    model, tok = load_model(name, device="cpu")
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        run_job(job, model, tok, n_samples, seq_len, Path(tmp))
    peak = peak_rss_bytes()
    act = activation_bytes(model.config, n_samples, seq_len)
    return {"job": job, "model": str(name), "model_bytes": size, "fixed_bytes": fixed, "peak_bytes": peak,
            "peak_over_fixed": peak - fixed, "activation_bytes": act, "ratio": (peak - fixed) / size,
            "ceiling_bytes": CEILING[job] * size + act, "ceiling": CEILING[job], "hidden": model.config.hidden_size,
            "intermediate": getattr(model.config, "intermediate_size", None), "n_samples": n_samples, "seq_len": seq_len, "seconds": time.time() - t0}


if __name__ == "__main__":
    a = sys.argv[1:]
    print(json.dumps(measure(a[0], a[1], *(int(x) for x in a[2:4]))))
