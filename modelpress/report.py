"""Run reports: report.json (everything) and report.md (the table), written beside the checkpoint."""
from __future__ import annotations

from pathlib import Path

from .utils.io import atomic_file, write_json


def fmt(v, nd: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def markdown_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    head = "| " + " | ".join(c[1] for c in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(fmt(r.get(c[0])) for c in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])


REPORT_COLUMNS = [
    ("label", "model"), ("ppl", "ppl"), ("kl", "KL to dense"), ("size_mb", "size MB"),
    ("bits_per_weight", "bits/weight (layers)"), ("bits_per_param", "bits/param (file)"), ("seconds", "time s"),
]


def write_report(out_dir: str | Path, report: dict) -> None:
    out_dir = Path(out_dir)
    write_json(out_dir / "report.json", report)
    rows = report.get("rows", [])
    md = [f"# modelpress report: {report.get('model', '')}", ""]
    for k in ("method", "budget", "data"):
        if k in report:
            md.append(f"- **{k}**: `{report[k]}`")
    columns = [tuple(c) for c in report.get("columns", REPORT_COLUMNS)]
    md += ["", markdown_table(rows, columns), ""]
    with atomic_file(out_dir / "report.md") as f:
        f.write("\n".join(md))
