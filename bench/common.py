"""Shared benchmark plumbing: resumable row cache, table printing, docs/benchmarks.md sections."""
from __future__ import annotations

import copy
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from modelpress.report import markdown_table  # noqa: E402
from modelpress.utils.io import atomic_file, write_json  # noqa: E402

DOCS = ROOT / "docs" / "benchmarks.md"
CACHE = ROOT / "bench" / "results"  # committed: every table re-renders from a fresh clone
SCRATCH = ROOT / ".bench_cache"  # large intermediates (level databases, BitStack folders), not committed


class RowCache:
    """Finished rows survive an interrupted benchmark: re-running skips them. With `force`, the rows
    already on disk count as missing (`get` returns None) until this run recomputes them; they stay
    on disk meanwhile, so `--force --only X` redoes X and keeps every other section's rows."""

    def __init__(self, name: str, force: bool = False):
        self.path = CACHE / f"{name}.json"
        self.rows: dict[str, dict] = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.stale: set[str] = set(self.rows) if force else set()

    def get(self, key: str) -> dict | None:
        return None if key in self.stale else self.rows.get(key)

    def put(self, key: str, row: dict) -> None:
        """Store one row, merged into what is on disk now: two runs of one benchmark (say, two
        sections of bench/search.py) may share the cache without dropping each other's rows."""
        self.stale.discard(key)
        disk = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.rows = {**disk, **self.rows, key: row}
        write_json(self.path, self.rows)

    def everything(self) -> "RowCache":
        """The same rows with none treated as missing: what a rendered table shows."""
        view = copy.copy(self)
        view.stale = set()
        return view


def measure_rows(cache: RowCache, rows: dict, args, measure) -> None:
    """`cache.put(key, measure(value))` for every row of `rows` (key -> what to measure) the cache
    lacks and --only selects; nothing with --render."""
    for key, value in rows.items():
        if not args.render and not cache.get(key) and (not args.only or args.only in key):
            row = measure(value)
            print(key, row, flush=True)
            cache.put(key, row)


def bench_args(description: str | None = None, n_eval: int = 16, extra=None):
    """The options every row-cached benchmark takes: --only SUBSTRING, --force, --n-eval, --render;
    `extra(parser)` adds a script's own."""
    import argparse

    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--only", default=None, help="run only the rows whose key contains this")
    ap.add_argument("--force", action="store_true", help="measure the cached rows again")
    ap.add_argument("--n-eval", type=int, default=n_eval, help="held-out windows per domain")
    ap.add_argument("--render", action="store_true", help="only render the cached rows")
    if extra is not None:
        extra(ap)
    return ap.parse_args()


def machine() -> str:
    import torch

    if torch.cuda.is_available():
        dev = torch.cuda.get_device_name(0)
    else:  # the CPU's model and vector unit: timings differ several-fold between CPUs
        name = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                     if ln.startswith("model name")), "CPU") if Path("/proc/cpuinfo").is_file() else "CPU"
        dev = f"{name} ({torch.backends.cpu.get_cpu_capability()}), {os.cpu_count()} cores"
    return (f"{platform.machine()} {dev}, torch {torch.__version__}, Python {platform.python_version()}, "
            f"{time.strftime('%Y-%m-%d')}")


def write_section(key: str, body: str) -> None:
    """Replace (or append) the section between <!-- bench:key --> markers in docs/benchmarks.md."""
    DOCS.parent.mkdir(parents=True, exist_ok=True)
    text = DOCS.read_text() if DOCS.is_file() else "# Benchmarks\n\nEvery table here is written by a script in `bench/`; rerun it to refresh.\n"
    start, end = f"<!-- bench:{key} -->", f"<!-- /bench:{key} -->"
    block = f"{start}\n{body.strip()}\n{end}"
    old = re.search(re.escape(start) + r"(.*?)" + re.escape(end), text, flags=re.S)
    if old and _table_rows(body) == 0 and _table_rows(old.group(1)) > 0:
        # an empty row cache (a fresh clone before the script ran) must not wipe a measured table
        print(f"docs/benchmarks.md: section {key} kept: no cached rows to render (run the script to measure them)")
        return
    if start in text:
        text = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    with atomic_file(DOCS) as f:
        f.write(text)


def _table_rows(md: str) -> int:
    """Data rows of the markdown tables in `md` (header and separator lines not counted)."""
    lines = [ln for ln in md.splitlines() if ln.startswith("|")]
    return max(0, len(lines) - 2 * sum(1 for ln in lines if set(ln.replace("|", "").strip()) <= {"-", " "}))


def section_tables(key: str) -> list[dict[str, str]]:
    """The rows of every table in a rendered section of docs/benchmarks.md, as {header: cell}.
    What another benchmark published is readable here even where its row cache (ignored by git,
    one per machine) is not."""
    text = DOCS.read_text() if DOCS.is_file() else ""
    m = re.search(re.escape(f"<!-- bench:{key} -->") + r"(.*?)" + re.escape(f"<!-- /bench:{key} -->"), text, flags=re.S)
    rows, head, heading = [], None, ""
    for line in (m.group(1) if m else "").splitlines():
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        if not line.startswith("|"):
            head = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if head is None:
            head = cells
        elif not all(set(c) <= set("-: ") for c in cells):
            rows.append({**dict(zip(head, cells)), "_heading": heading})
    return rows


def published_rows(key: str, columns: list[tuple[str, str]]) -> list[dict]:
    """`section_tables` with cells turned back into row fields (`columns` as given to print_table:
    (field, header)); numbers become floats, "–" None. Each row keeps its table's heading."""
    back = {header: field for field, header in columns}
    out = []
    for r in section_tables(key):
        row = {"_heading": r["_heading"]}
        for header, cell in r.items():
            if header in back:
                if cell in ("–", ""):
                    row[back[header]] = None
                elif re.fullmatch(r"-?\d+", cell):
                    row[back[header]] = int(cell)
                else:
                    try:
                        row[back[header]] = float(cell)
                    except ValueError:
                        row[back[header]] = cell
        out.append(row)
    return out


def published_machine(key: str) -> str | None:
    """The "Machine: ..." line of a published section, without its date."""
    m = re.search(re.escape(f"<!-- bench:{key} -->") + r".*?Machine: (.*?), (\d{4}-\d{2}-\d{2})",
                  DOCS.read_text() if DOCS.is_file() else "", flags=re.S)
    return m.group(1) if m else None


def same_machine(key: str) -> bool:
    """Was the published section measured on this kind of machine (same hardware, torch, Python,
    so the same `pydoc` text)? Its rows may then stand in for a row cache this machine lacks."""
    return published_machine(key) == machine().rsplit(", ", 1)[0]


def not_run_note(missing: list[str], script: str) -> str:
    """The sentence a partial table carries: which rows are still to run, and how to resume."""
    return f"Not run yet: {', '.join(missing)} (`python bench/{script}` resumes). " if missing else ""


def print_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    md = markdown_table(rows, columns)
    print(md)
    return md
