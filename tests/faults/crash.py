"""Crash trials: run a job (tests/faults/child.py) as a subprocess, SIGKILL it at a seeded random
moment, check what it left on disk, run it again to the end and compare with an uninterrupted run.

What a trial checks:
- right after the kill, every reader either refuses what is there or gets a finished result
  (a previous checkpoint being replaced stays loadable; a database holds only whole units);
- the rerun finishes and its result equals the uninterrupted run's, bit for bit;
- no work the killed run had finished (a database level on disk, a saved search generation) is
  done again;
- no temporary file or folder is left behind.
`trials(job, n, seed)` returns the counts; tests/faults/test_crash.py runs a few per job,
bench/reliability.py more.
"""
from __future__ import annotations

import collections
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
JOBS = ("database", "search", "compress", "bitstack", "gguf")


def run_child(job: str, work: Path, events: Path, kill_after: float | None = None) -> tuple[bool, float]:
    """Run the job; with `kill_after`, SIGKILL it that many seconds after it is ready. Returns
    (killed, seconds from ready to exit or kill)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    with open(work / "stderr.log", "ab") as err:
        p = subprocess.Popen([sys.executable, "-m", "tests.faults.child", job, str(work), str(events)], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=err, env=env)
        line = p.stdout.readline()
        t0 = time.monotonic()
        if line.strip() != b"ready":
            p.wait()
            raise RuntimeError(f"child {job} failed to start: {(work / 'stderr.log').read_text()[-2000:]}")
        if kill_after is None:  # the job's own length: from ready to done (not the interpreter's exit)
            p.stdout.readline()
            span = time.monotonic() - t0
            p.wait()
            if p.returncode != 0:
                raise RuntimeError(f"child {job} exited {p.returncode}: {(work / 'stderr.log').read_text()[-2000:]}")
            return False, span
        try:
            p.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGKILL)
            p.wait()
            return True, time.monotonic() - t0
        if p.returncode != 0:
            raise RuntimeError(f"child {job} exited {p.returncode}: {(work / 'stderr.log').read_text()[-2000:]}")
        return False, time.monotonic() - t0


def events(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.is_file() else []


# ---- what each job's result is, and who may read it half-made ---------------------------------
def _db_snapshot(folder: Path) -> dict:
    """unit -> {"levels": level metadata, tensor name: tensor} of every unit file that reads back."""
    import json

    from safetensors import safe_open

    out = {}
    for f in sorted((folder / "units").glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            md = sf.metadata()
            out[f.stem] = {"levels": json.loads(md["levels"]), **{k: sf.get_tensor(k) for k in sf.keys()}}
    return out


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def _files_of(folder: Path) -> dict:
    from modelpress.utils.io import read_json

    return read_json(folder / "modelpress.json", "manifest", "")["files"]


def result(job: str, work: Path):
    """The finished result of `job` in `work`, in a form that compares exactly."""
    from modelpress.utils.io import read_json, sha256_file

    if job == "database":
        return _db_snapshot(work / "out")
    if job == "search":
        state = read_json(work / "search.json", "search checkpoint", "")
        return {"plan": read_json(work / "plan.json", "plan", ""), "history": state["history"],
                "parent": state["parent"]}
    if job in ("compress", "bitstack"):
        return _files_of(work / "out")
    if job == "gguf":
        return sha256_file(work / "out.gguf")
    raise KeyError(job)


def check_partial(job: str, work: Path, ref, old) -> str | None:
    """What a reader finds right after the kill; a problem as text, or None."""
    import modelpress as mp
    from modelpress.errors import ModelpressError

    if job == "database":
        if not (work / "out" / "units").is_dir():
            return None
        have = _db_snapshot(work / "out")
        for unit, got in have.items():  # a unit on disk holds finished levels, equal to the reference's
            want = ref[unit]
            for k, t in got.items():
                if k == "levels":
                    if any(not _same(v, want["levels"].get(lv)) for lv, v in t.items()):
                        return f"unit {unit}: level metadata differs"
                elif not _same(t, want.get(k)):
                    return f"unit {unit}: tensor {k} differs"
        return None
    if job == "search":
        from modelpress.utils.io import read_json

        ck = work / "search.json"
        if ck.is_file():
            try:
                read_json(ck, "search checkpoint", "")
            except ModelpressError as e:
                return f"search checkpoint unreadable after the kill: {e}"
        return None
    if job in ("compress", "bitstack"):
        out = work / "out"
        try:
            mp.load_compressed(out)
            files = _files_of(out)
        except (ModelpressError, FileNotFoundError):
            if old is not None:
                return "the previous checkpoint is not loadable after the kill"
            return None
        if files != ref and files != old:
            return "a checkpoint that is neither the previous nor the new one"
        return None
    if job == "gguf":
        from modelpress.utils.io import sha256_file

        f = work / "out.gguf"
        if f.exists() and sha256_file(f) != ref:
            return "a half-written GGUF under the final name"
        return None
    raise KeyError(job)


def leftovers(work: Path) -> list[str]:
    return [str(p.relative_to(work)) for p in work.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name]


def prepare(job: str, trial: Path, ref_dir: Path) -> dict | None:
    """Put in `trial` what the job starts from; the previous result (compress: an older checkpoint
    the job replaces) or None."""
    trial.mkdir(parents=True)
    if job == "search":  # the search's database is built already: the kills land in the search
        shutil.copytree(ref_dir / "db", trial / "db")
    if job == "compress":
        shutil.copytree(ref_dir / "previous", trial / "out")
        return _files_of(trial / "out")
    return None


def trials(job: str, n: int, seed: int = 0, root: Path | None = None) -> dict:
    """`n` kill points of `job`, spread at random over an uninterrupted run's time."""
    root = Path(root or tempfile.mkdtemp(prefix=f"crash-{job}-"))
    ref_dir = root / "reference"
    ref_dir.mkdir(parents=True)
    if job == "compress":
        import modelpress as mp
        from tests.faults.child import model

        mp.compress(model(), None, "rtn", bits=4, group_size=16).save(ref_dir / "previous")
        shutil.copytree(ref_dir / "previous", ref_dir / "out")
    _, span = run_child(job, ref_dir, ref_dir / "events")
    ref = result(job, ref_dir)
    rng = np.random.default_rng(seed)
    counts = collections.Counter()
    failures: list[str] = []
    for t in range(n):
        trial = root / f"t{t}"
        old = prepare(job, trial, ref_dir)
        at = float(rng.uniform(0, span))
        killed, _ = run_child(job, trial, trial / "events1", kill_after=at)
        counts["killed" if killed else "finished before the kill"] += 1
        finished = [e for e in events(trial / "events1") if e != "done"]
        problem = check_partial(job, trial, ref, old)
        if problem:
            failures.append(f"kill at {at:.2f}s: {problem}")
        run_child(job, trial, trial / "events2")
        redone = set(finished) & set(events(trial / "events2"))
        if redone:
            failures.append(f"kill at {at:.2f}s: finished work done again: {sorted(redone)[:3]}")
        counts["units kept"] += len(finished)
        if not _same(result(job, trial), ref):
            failures.append(f"kill at {at:.2f}s: the rerun's result differs from the uninterrupted run's")
        left = leftovers(trial)
        if left:
            failures.append(f"kill at {at:.2f}s: left behind {left[:3]}")
        shutil.rmtree(trial)
    shutil.rmtree(root, ignore_errors=True)
    return {"job": job, "trials": n, **counts, "span_s": span, "failures": failures}
