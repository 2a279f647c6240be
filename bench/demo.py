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

COLUMNS = [("label", "model"), ("ppl", "ppl"), ("kl", "KL to dense"), ("size_mb", "size MB"),
           ("bits_per_weight", "bits/weight (layers)"), ("search", "search s")]


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
            "tokens": report["method"]["allocator_settings"].get("tokens")}


def render(r: dict) -> None:
    md = print_table(r["rows"], COLUMNS)
    body = ("## `make demo` from a fresh clone (`bench/demo.py`)\n\n"
            "A new clone, an empty modelpress cache and a new `.venv` (PyTorch and the other wheels from the "
            "machine's local package mirror), then `make demo`: SmolLM2-135M to 3 bits/weight on average, "
            "evolutionary search against uniform 3-bit, CPU defaults (levels 2/3/4 with GPTQ g64"
            + (f", all calibrated on the {r['sequential_level']}-bit model's inputs" if r.get("sequential_level") else "")
            + f", 32 x 512 calibration tokens, {r['generations']} generations"
            + (f" on {'/'.join(map(str, r['tokens']))} tokens per selection stage" if r.get("tokens") else "")
            + ", 16 held-out evaluation windows). "
            f"Wall time of the whole command: **{r['wall_s'] / 60:.1f} min** ({r['wall_s']:.0f} s; target < 15 min), "
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
