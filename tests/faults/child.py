"""A job the crash tests kill with SIGKILL: `python -m tests.faults.child JOB WORK EVENTS`.

Prints "ready" once imports and the tiny model are done (the parent times its kill from there),
runs JOB into WORK and appends to EVENTS a line for each piece of work it finishes and keeps
("unit NAME VALUE" for a database level written to disk, "generation G" for a saved search
generation), then "done". Every job is deterministic: an uninterrupted run is the reference.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

torch.set_num_threads(1)  # the same kernels in every run: results compare bit for bit

QK = dict(levels=(2, 3, 4), group_size=16)
SEARCH = dict(generations=6, offspring=4, tokens=(64, 128), survivors=(2, 1), init="uniform")


def windows():
    from modelpress.data import DataConfig, Windows

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (16, 32), generator=g)
    return Windows(ids[:12], ids[12:], [], [], DataConfig(n_samples=12, seq_len=32))


def model():
    from tests.conftest import tiny_model

    return tiny_model("llama", layers=2)


def run(job: str, work: Path, events: Path) -> None:
    import modelpress as mp
    from modelpress.levels import LevelDB
    from modelpress.search import open_database

    log = open(events, "a", buffering=1)

    real_add = LevelDB.add_levels

    def add_levels(self, unit, new):
        real_add(self, unit, new)
        for v in new:
            log.write(f"unit {unit} {v}\n")

    LevelDB.add_levels = add_levels
    m, w = model(), windows()
    print("ready", flush=True)
    if job == "database":
        open_database(m, None, "quant", data=w, db=work / "out", **QK)
    elif job == "search":
        from modelpress.allocate.budget import Budget
        from modelpress.allocate.evolutionary import Evolutionary
        from modelpress.search import SearchSettings, allocate
        from modelpress.utils.io import write_json

        real_save = Evolutionary._save

        def save(self, ck, key, gen, *a):
            real_save(self, ck, key, gen, *a)
            log.write(f"generation {gen}\n")

        Evolutionary._save = save
        db = open_database(m, None, "quant", data=w, db=work / "db", **QK)
        res = allocate(m, db, Budget("bits", 3.0), "evolutionary", data=w,
                       settings=SearchSettings(fitness_windows=8, validation_windows=2),
                       checkpoint=str(work / "search.json"), **SEARCH)
        write_json(work / "plan.json", res.plan.levels)
    elif job == "compress":
        mp.compress(m, None, "gptq", data=w, bits=3, group_size=16).save(work / "out")
    elif job == "bitstack":
        from modelpress.export.bitstack import build_bitstack

        build_bitstack(m, None, w, work / "out")
    elif job == "gguf":
        from modelpress.export.ggufio import export_gguf
        from tests.conftest import byte_tokenizer

        export_gguf(m, work / "out.gguf", default_type="Q4_0", tokenizer=byte_tokenizer())
    else:
        raise SystemExit(f"unknown job {job}")
    log.write("done\n")
    print("done", flush=True)


if __name__ == "__main__":
    run(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]))
