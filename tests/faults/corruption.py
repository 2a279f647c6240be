"""Corruption fuzz: damage a file modelpress reads back (one flipped byte at a random offset, or the
file cut at a random length) and see what the reader does. Acceptable outcomes only:

- `detected`: a ModelpressError with a one-line message (the CLI prints it and exits 2), or for a
  level database unit the unit is rebuilt and equals the original;
- `harmless`: the damaged file still means the same thing (a flipped JSON whitespace byte) and the
  result equals the original.

Anything else, a wrong result or another exception, is a failure. Each `*_trials` function runs
`n` seeded trials of one artifact and returns the counts; tests/faults/test_corruption.py runs a
few, bench/reliability.py many (docs/reliability.md).
"""
from __future__ import annotations

import collections
import copy
import json
import shutil
import struct
from pathlib import Path

import numpy as np
import torch

import modelpress as mp
from modelpress.errors import ModelpressError


def damage(path: Path, rng: np.random.Generator) -> str:
    """Flip one byte or truncate `path`. A safetensors file gets half its flips in its JSON header
    (the metadata: formats, sizes, errors), the other half anywhere."""
    data = bytearray(path.read_bytes())
    if rng.random() < 0.3:
        cut = int(rng.integers(0, len(data)))
        path.write_bytes(bytes(data[:cut]))
        return f"cut at {cut} of {len(data)}"
    end = len(data)
    if path.suffix == ".safetensors" and rng.random() < 0.5:
        end = min(len(data), 8 + struct.unpack("<Q", bytes(data[:8]))[0])
    i = int(rng.integers(0, end))
    data[i] ^= int(rng.integers(1, 256))
    path.write_bytes(bytes(data))
    return f"byte {i} of {len(data)} flipped"


class Outcomes:
    def __init__(self) -> None:
        self.counts: collections.Counter = collections.Counter()
        self.failures: list[str] = []

    def detected(self, err: Exception, what: str) -> None:
        if "\n" in str(err):
            self.failures.append(f"{what}: multi-line error {str(err)!r}")
        self.counts["detected"] += 1

    def compare(self, same: bool, what: str) -> None:
        if same:
            self.counts["harmless"] += 1
        else:
            self.failures.append(f"{what}: loaded a different result without an error")

    def crash(self, err: BaseException, what: str) -> None:
        self.failures.append(f"{what}: {type(err).__name__}: {err}")

    def as_dict(self) -> dict:
        return {"trials": sum(self.counts.values()) + len(self.failures), **self.counts,
                "failures": self.failures}


def _trial(out: Outcomes, what: str, run, compare) -> None:
    """`run()` reads the damaged artifact; a ModelpressError is a detection, so is `None` (a reader
    that sets the file aside and starts over, saying so in the log); a result is compared."""
    try:
        result = run()
    except ModelpressError as e:
        out.detected(e, what)
        return
    except Exception as e:  # noqa: BLE001 - any other exception is what the fuzz looks for
        out.crash(e, what)
        return
    if result is None:
        out.counts["detected"] += 1
    else:
        out.compare(compare(result), what)


def _damaged_copies(path: Path, work: Path, n: int, rng, prefix: str):
    """(copy, what was done to it) for n damaged copies of the file `path`, each in its own folder."""
    for t in range(n):
        trial = work / f"{prefix}{t}" / path.name
        trial.parent.mkdir(parents=True)
        shutil.copy(path, trial)
        yield trial, f"{path.name} {damage(trial, rng)}"
        shutil.rmtree(trial.parent)


def checkpoint_trials(folder: Path, work: Path, n: int, seed: int = 0) -> dict:
    """A saved compressed checkpoint: load_compressed gives identical logits or a one-line error."""
    rng = np.random.default_rng(seed)
    ids = torch.arange(64).reshape(2, 32) % 200
    with torch.no_grad():
        want = mp.load_compressed(folder)(ids).logits
    files = sorted(p.name for p in folder.iterdir() if p.is_file())
    out = Outcomes()
    for t in range(n):
        trial = work / f"ck{t}"
        shutil.copytree(folder, trial)
        name = files[t % len(files)]
        what = f"{name} {damage(trial / name, rng)}"

        def run():
            with torch.no_grad():
                return mp.load_compressed(trial)(ids).logits

        _trial(out, what, run, lambda got: torch.equal(got, want))
        shutil.rmtree(trial)
    return out.as_dict()


def json_trials(path: Path, work: Path, n: int, read, seed: int = 0) -> dict:
    """A JSON file modelpress wrote (plan, search checkpoint, sensitivity cache, db.json):
    `read(path)` returns what it makes of it; it must equal what it makes of the intact file, or
    report the damage (a ModelpressError, or `None` where the reader starts over)."""
    rng = np.random.default_rng(seed)
    tmp = work / "intact" / path.name
    tmp.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, tmp)
    want = read(tmp)
    out = Outcomes()
    for trial, what in _damaged_copies(path, work, n, rng, "j"):
        _trial(out, what, lambda: read(trial), lambda got: got == want)
    return out.as_dict()


def database_unit_trials(db_folder: Path, work: Path, n: int, reopen, seed: int = 0) -> dict:
    """Level database unit files: a damaged unit is rebuilt (`reopen(folder)` opens and completes
    the database) and every level of it then equals the original, bit for bit."""
    rng = np.random.default_rng(seed)
    intact = reopen(db_folder)
    units = sorted(intact.units)
    out = Outcomes()
    for t in range(n):
        trial = work / f"db{t}"
        shutil.copytree(db_folder, trial)
        unit = units[int(rng.integers(len(units)))]
        f = intact._file(unit)
        what = f"unit {unit} {damage(trial / 'units' / f.name, rng)}"

        def run():
            return reopen(trial)

        def same(db) -> bool:
            return all(db.level_meta(u, v) == intact.level_meta(u, v)
                       and torch.equal(db.load(u, v).dequantize(), intact.load(u, v).dequantize())
                       for u in (unit, units[0]) for v in intact.kind.values(intact.units[u]))

        try:
            db = run()
        except Exception as e:  # noqa: BLE001 - a unit must be rebuilt, not reported
            out.crash(e, what)
        else:
            if same(db):
                out.counts["detected"] += 1  # rebuilt or untouched, equal either way
            else:
                out.failures.append(f"{what}: the rebuilt unit differs")
        shutil.rmtree(trial)
    return out.as_dict()


def search_state(n_units: int = 40) -> dict:
    """A search checkpoint's content, shaped like the evolutionary allocator's."""
    rng = np.random.default_rng(1)
    return {"key": "k" * 16, "generation": 7, "parent": [int(x) for x in rng.integers(0, 5, n_units)],
            "fitness": 0.123456789, "rng": copy.deepcopy(np.random.default_rng(3).bit_generator.state),
            "history": [{"generation": g, "fitness": 0.2 / (g + 1), "validation": 0.3 / (g + 1)} for g in range(7)],
            "start_validation": 0.31, "start_plan": "uniform"}


def read_search_state(path: Path):
    from modelpress.allocate.evolutionary import Evolutionary

    return Evolutionary._resumable(path, "k" * 16)


def read_sensitivity(path: Path):
    from modelpress.allocate.sensitivity import _cached

    return _cached(path, "s" * 16) or None


def read_plan(path: Path):
    from modelpress.allocate.plan import Plan

    return Plan.load(path)


def json_artifacts(work: Path) -> dict[str, tuple[Path, object]]:
    """The JSON files modelpress writes for itself, each beside its reader."""
    from modelpress.allocate.plan import Plan
    from modelpress.utils.io import write_json

    work.mkdir(parents=True, exist_ok=True)
    files = {}
    p = work / "plan.json"
    Plan(kind="quant", levels={f"model.layers.{i}.mlp.up_proj": 2 + i % 3 for i in range(30)},
         budget={"kind": "bits", "value": 3.0}, allocator={"name": "evolutionary"}).save(p)
    files["plan"] = (p, read_plan)
    p = work / "search.json"
    write_json(p, search_state(), checksum=True)
    files["search checkpoint"] = (p, read_search_state)
    p = work / "sensitivity.json"
    write_json(p, {"key": "s" * 16, "fitness": 0.25, "delta": {f"{u}:{i}": 1e-3 * u * i for u in range(20)
                                                               for i in range(3)}}, checksum=True)
    files["sensitivity cache"] = (p, read_sensitivity)
    return files


def db_json_reader(model_fn, kind, windows):
    """Opening a level database whose db.json may be damaged: its meta, or a one-line error."""
    from modelpress.levels import LevelDB

    def read(path: Path):
        folder = path.parent
        if not (folder / "units").is_dir():
            (folder / "units").mkdir()
        return json.loads(json.dumps(LevelDB.open_or_create(folder, model_fn(), kind, windows).meta))

    return read


def gguf_trials(path: Path, work: Path, n: int, seed: int = 0) -> dict:
    """A GGUF file modelpress wrote: loading it (the conversion verifies the checksum modelpress
    wrote into it) gives the same logits or a one-line error."""
    from modelpress.models import load_model

    rng = np.random.default_rng(seed)
    ids = torch.arange(64).reshape(2, 32) % 200
    with torch.no_grad():
        want = load_model(path, device="cpu")[0](ids).logits
    out = Outcomes()
    for trial, what in _damaged_copies(path, work, n, rng, "g"):
        def run():
            with torch.no_grad():
                return load_model(trial, device="cpu")[0](ids).logits

        _trial(out, what, run, lambda got: torch.equal(got, want))
    return out.as_dict()
