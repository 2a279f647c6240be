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


def report_columns(domains: list[str]) -> list[tuple[str, str]]:
    """A compression report's columns: perplexity per evaluation domain, the worst ratio to dense,
    KL, then sizes and time."""
    from .eval.suite import suite_columns

    return [("label", "model"), *suite_columns(domains), ("size_mb", "size MB"),
            ("bits_per_weight", "bits/weight (layers)"), ("bits_per_param", "bits/param (file)"), ("seconds", "time s")]


def _per_domain(ev: dict) -> list[tuple[str, object]]:
    n = ev.get("windows_per_domain")
    return [(d, n.get(d, "?") if isinstance(n, dict) else n) for d in ev.get("domains", [])]


def write_report(out_dir: str | Path, report: dict) -> None:
    out_dir = Path(out_dir)
    write_json(out_dir / "report.json", report)
    rows = report.get("rows", [])
    md = [f"# modelpress report: {report.get('model', '')}", ""]
    for k in ("method", "budget", "data"):
        if k in report:
            md.append(f"- **{k}**: `{report[k]}`")
    ev = report.get("evaluation")
    if ev:
        md.append(f"- **evaluation**: held-out windows of {', '.join(f'{d} ({n})' for d, n in _per_domain(ev))}; "
                  "worst = the largest perplexity ratio to dense over the domains")
        for d, why in ev.get("skipped", {}).items():
            md.append(f"- **skipped domain {d}**: {why}")
    columns = [tuple(c) for c in report.get("columns", report_columns([]))]
    md += ["", markdown_table(rows, columns), ""]
    with atomic_file(out_dir / "report.md") as f:
        f.write("\n".join(md))
