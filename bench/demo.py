"""Time `make demo` the way a new user meets it: a fresh clone, an empty modelpress cache, a new venv.

    python bench/demo.py              # clone, run `make demo` under /usr/bin/time, write the section
    python bench/demo.py --from DIR   # render a run already made this way (DIR/x is the clone,
                                      # DIR/demo.log the output of `/usr/bin/time -v make demo`)

Run it on an idle machine: the wall time is the result.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

from common import ROOT, RowCache, machine, print_table, write_section



def run(workdir: Path) -> None:
    subprocess.run(["git", "clone", "-q", str(ROOT), str(workdir / "x")], check=True)
    env = dict(os.environ, MODELPRESS_CACHE=str(workdir / "cache"))
    with open(workdir / "demo.log", "w") as log:
        subprocess.run(["/usr/bin/time", "-v", "make", "demo"], cwd=workdir / "x", env=env, stdout=log,
                       stderr=subprocess.STDOUT, check=True)


def measure(workdir: Path) -> dict:
    log = (workdir / "demo.log").read_text(errors="replace")
    m = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (?:(\d+):)?(\d+):([\d.]+)", log)
    if not m:
        raise SystemExit(f"{workdir / 'demo.log'} has no /usr/bin/time -v output")
    wall = int(m.group(1) or 0) * 3600 + int(m.group(2)) * 60 + float(m.group(3))
    report = json.loads((workdir / "x" / "out" / "demo" / "report.json").read_text())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=workdir / "x", capture_output=True,
                            text=True).stdout.strip()
    return {"wall_s": wall, "rows": report["rows"], "pipeline_s": report["seconds"],
            "database_s": report["database"].get("build_seconds"), "search_s": report["fitness"].get("seconds"),
            "generations": len(report["history"]), "commit": commit, "machine": machine(),
            "sequential_level": report["method"].get("sequential_level"),
            "tokens": report["method"]["allocator_settings"].get("tokens"),
            "data": report["data"], "evaluation": report.get("evaluation"), "columns": report.get("columns"),
            "fitness": report.get("fitness")}


def render(r: dict) -> None:
    md = print_table(r["rows"], [tuple(c) for c in r["columns"]])
    ev = r["evaluation"]
    fit = r.get("fitness") or {}
    gen = fit.get("selected_generation")
    where = {True: "windows of the calibration source after the calibration and fitness windows",
             False: "calibration windows"}.get(fit.get("held_out"), "windows")
    val = (f"The search's validation KL ({fit['validation_windows']} {where}, which never pick offspring) "
           f"went from {fit['start_validation']:.4f} at its start to {fit['final_validation']:.4f} for the plan it "
           + (f"returned (generation {gen}). " if gen is not None else "returned. ")
           if fit.get("final_validation") is not None else "")
    beats = next((row.get("beats_uniform_on_every_domain") for row in r["rows"] if row["label"] == "evolutionary"), None)
    body = ("## `make demo` from a fresh clone (`bench/demo.py`)\n\n"
            "A new clone, an empty modelpress cache and a new `.venv` (PyTorch and the other wheels from the "
            "machine's local package mirror), then `make demo`: SmolLM2-135M to 3 bits/weight on average, "
            "evolutionary search against uniform 3-bit, CPU defaults (levels 2/3/4 with GPTQ g64"
            + (f", all calibrated on the {r['sequential_level']}-bit model's inputs" if r.get("sequential_level") else "")
            + f", {r['data']['n_samples']} x {r['data']['seq_len']} calibration tokens of `{r['data']['corpus']}`, "
            f"{r['generations']} generations"
            + (f" on {'/'.join(map(str, r['tokens']))} tokens per selection stage" if r.get("tokens") else "")
            + f"; evaluation: {', '.join(ev['domains'])}, {max(ev['windows_per_domain'].values())} held-out windows "
            "each). "
            + val
            + ("The searched plan beats uniform on every domain. " if beats else
               "The searched plan does **not** beat uniform on every domain. " if beats is False else "")
            + f"Wall time of the whole command: **{r['wall_s'] / 60:.1f} min** ({r['wall_s']:.0f} s; target < 15 min), "
            f"of which the pipeline took {r['pipeline_s']:.0f} s: database {r['database_s']:.0f} s, search "
            f"{r['search_s']:.0f} s; the rest is venv, install, model conversion and evaluation. "
            f"Commit {r['commit']}. Machine: {r['machine']}.\n\n" + md)
    write_section("demo", body)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--from", dest="src", type=Path, default=None)
    args = ap.parse_args()
    cache = RowCache("demo")
    if args.src is None:
        workdir = Path(tempfile.mkdtemp(prefix="modelpress-demo-"))
        run(workdir)
    else:
        workdir = args.src
    r = measure(workdir)
    cache.put("demo", r)
    print(json.dumps({k: v for k, v in r.items() if k != "rows"}))
    render(r)


if __name__ == "__main__":
    main()
