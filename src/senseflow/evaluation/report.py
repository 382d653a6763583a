"""What a person reads: ``results.md`` (the metric table) and ``index.html`` (table + images side by side).

One row per source (teacher, students, pipelines); in the HTML page one row per prompt with every
source's image for the same (prompt, seed) next to each other.  Images are referenced by relative
path (``images/<label>/NNNNN.png``), so the folder can be copied or served as it is.
"""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Any

from .store import write_text_atomic

#: metrics where lower is better (the table marks the best value per column)
LOWER_IS_BETTER = ("fid", "fd_", "patch_fid", "kid")


def lower_is_better(key: str) -> bool:
    return key.startswith(LOWER_IS_BETTER)


def metric_columns(results: dict[str, Any]) -> list[str]:
    cols: list[str] = []
    for row in results["sources"].values():
        for k in row["metrics"]:
            if k not in cols:
                cols.append(k)
    return cols


def _steps(row: dict[str, Any]) -> str:
    s = row["settings"]
    steps = s.get("steps") or s.get("call", {}).get("num_inference_steps")
    return "-" if steps is None else str(steps)


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.4f}" if abs(v) < 10 else f"{v:.2f}"


def best_per_column(results: dict[str, Any], cols: list[str]) -> dict[str, str]:
    best: dict[str, str] = {}
    for c in cols:
        vals = [(row["metrics"].get(c), label) for label, row in results["sources"].items()
                if row["metrics"].get(c) is not None]
        if len(vals) >= 2:
            best[c] = (min(vals) if lower_is_better(c) else max(vals))[1]
    return best


def markdown_table(results: dict[str, Any]) -> str:
    cols = metric_columns(results)
    best = best_per_column(results, cols)
    head = ["source", "kind", "steps", *cols, "s/img"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, row in results["sources"].items():
        cells = [label, row["kind"], _steps(row)]
        for c in cols:
            v = _fmt(row["metrics"].get(c))
            cells.append(f"**{v}**" if best.get(c) == label else v)
        spi = row.get("seconds_per_image")
        cells.append("-" if spi is None else f"{spi:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_markdown(path: Path, results: dict[str, Any]) -> None:
    proto = results.get("protocol") or {}
    title = proto.get("name", "custom")
    ref = results.get("reference")
    note = f"FID-T / fd_teacher are measured against `{ref}`. " if ref else ""
    text = (f"# Evaluation: {title}\n\n{results['num_images']} images per source. {note}Best value per column in "
            f"bold (lower is better for FID / FD columns).\n\n{markdown_table(results)}\n")
    write_text_atomic(path, text)


def write_html(path: Path, results: dict[str, Any], prompts, stores: dict, out: Path, rows: int) -> None:
    cols = metric_columns(results)
    best = best_per_column(results, cols)
    labels = list(results["sources"])
    esc = html.escape
    table = ["<table class='m'><tr><th>source</th><th>kind</th><th>steps</th>"
             + "".join(f"<th>{esc(c)}</th>" for c in cols) + "<th>s/img</th></tr>"]
    for label, row in results["sources"].items():
        cells = "".join(f"<td{' class=best' if best.get(c) == label else ''}>{_fmt(row['metrics'].get(c))}</td>"
                        for c in cols)
        spi = row.get("seconds_per_image")
        table.append(f"<tr><td>{esc(label)}</td><td>{esc(row['kind'])}</td><td>{_steps(row)}</td>{cells}"
                     f"<td>{'-' if spi is None else f'{spi:.3f}'}</td></tr>")
    table.append("</table>")
    grid = ["<table class='g'><tr><th>#</th><th>prompt</th>" + "".join(f"<th>{esc(x)}</th>" for x in labels) + "</tr>"]
    for i in range(min(rows, len(prompts))):
        imgs = "".join(f"<td><img src='{esc(os.path.relpath(stores[x].png(i), out))}' loading='lazy'></td>"
                       for x in labels)
        grid.append(f"<tr><td>{i}</td><td class='p'>{esc(prompts.prompts[i])}<br><small>seed {prompts.seeds[i]}"
                    f"</small></td>{imgs}</tr>")
    grid.append("</table>")
    proto = results.get("protocol") or {}
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>senseflow evaluation</title>
<style>body{{font-family:sans-serif;margin:1.5em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;
padding:4px 8px}}td.best{{font-weight:bold;background:#e8f5e9}}.g img{{width:192px;image-rendering:pixelated}}
td.p{{max-width:260px;font-size:90%}}</style></head><body>
<h1>Evaluation: {esc(str(proto.get('name', 'custom')))}</h1>
<p>{results['num_images']} images per source; reference: {esc(str(results.get('reference')))}.
Best value per column highlighted. Numbers in <code>results.json</code>, provenance in <code>manifest.json</code>.</p>
{''.join(table)}
<h2>Same prompt and seed, side by side (first {min(rows, len(prompts))})</h2>
{''.join(grid)}
</body></html>
"""
    write_text_atomic(path, page)
