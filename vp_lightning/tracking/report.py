"""Local token-utilization dashboard: ``vp-lightning report <run or sweep folders ...> -o report.html``.

Reads finished runs from disk (``config.yaml`` + ``metrics.csv`` + token counts; see
:mod:`vp_lightning.tracking.runs`) and writes ONE self-contained HTML file: inline SVG plots and CSS, no script,
no external resource, so it opens offline and can be mailed or attached as is. Panels:

* token usage over training (CVU, perplexity, utilization, dead codes per validation), coloured by quantizer;
* final CVU and perplexity per run;
* sorted code frequencies at the last validation;
* parallel coordinates of eta (and the other perturbation settings) vs reconstruction/quality vs CVU;
* a table of final numbers per run (quantizer, K, eta, CVU, perplexity, utilization, dead codes, quality).
"""

from __future__ import annotations

import argparse
import html
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from vp_lightning.errors import UserError
from vp_lightning.tracking.runs import (
    AUDIO_QUALITY_KEYS,
    IMAGE_QUALITY_KEYS,
    RunData,
    find_runs,
    format_duration,
    format_number,
    sort_runs,
)

#: Table columns of final numbers: (header, metric key, better = "max" | "min", tooltip).
METRIC_COLUMNS = [
    ("CVU", "val/codebook/cvu", "max", "codebook valid usage: exp(entropy of token frequencies) / K"),
    ("perplexity", "val/codebook/perplexity", "max", "exp(entropy): the effective number of codes"),
    ("utilization", "val/codebook/utilization", "max", "share of codes used at least once"),
    ("dead codes", "val/codebook/dead_codes", "min", "codes never used at the last validation"),
    ("rec. loss", "val/loss/rec", "min", "weighted reconstruction loss on the validation set"),
]
QUALITY_COLUMNS = {
    "val/psnr": ("PSNR", "max"), "val/ssim": ("SSIM", "max"), "val/lpips": ("LPIPS", "min"),
    "val/pesq": ("PESQ", "max"), "val/stoi": ("STOI", "max"), "val/si_snr": ("SI-SNR", "max"),
    "val/mel_distance": ("mel dist.", "min"),
}

CSS = """
:root { --fg:#1d2330; --muted:#5b6577; --line:#e3e7ee; --card:#ffffff; --bg:#f4f6fa; --accent:#1f5fbf; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--fg);
       font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; }
header { background:#18243a; color:#fff; padding:22px 32px 18px; }
header h1 { margin:0 0 4px; font-size:22px; font-weight:650; letter-spacing:.2px; }
header p { margin:0; color:#c5cedd; font-size:13px; }
main { max-width:1320px; margin:0 auto; padding:20px 24px 40px; }
section { background:var(--card); border:1px solid var(--line); border-radius:10px; padding:16px 20px 14px;
          margin:0 0 18px; box-shadow:0 1px 2px rgba(20,30,50,.04); }
section h2 { margin:0 0 2px; font-size:16px; font-weight:650; }
section p.note { margin:0 0 10px; color:var(--muted); font-size:12.5px; }
.figure svg { width:100%; height:auto; display:block; }
.table-wrap { overflow-x:auto; }
table { border-collapse:collapse; width:100%; font-size:12px; font-variant-numeric: tabular-nums; }
th, td { padding:5px 6px; border-bottom:1px solid var(--line); text-align:right; white-space:nowrap; }
th { background:#f0f3f8; color:#364055; font-weight:600; position:sticky; top:0; }
th:first-child, td:first-child, th.text, td.text { text-align:left; }
tr:hover td { background:#f7f9fc; }
td.best { font-weight:700; color:var(--accent); }
.swatch { display:inline-block; width:10px; height:10px; border-radius:2px; margin-right:6px; vertical-align:-1px; }
.status-failed, .status-interrupted { color:#b3261e; font-weight:600; }
.status-stopped { color:#8a5a00; }
.sources { color:var(--muted); font-size:12px; margin-top:8px; word-break:break-all; }
.empty { color:var(--muted); font-style:italic; }
"""


def _hex(color: Any) -> str:
    r, g, b = (int(round(255 * c)) for c in color[:3])
    return f"#{r:02x}{g:02x}{b:02x}"


def table_columns(runs: list[RunData]) -> list[tuple[str, str, str, str]]:
    """The metric columns to show: usage and reconstruction always, quality metrics when any run logged them."""
    quality_keys = [*IMAGE_QUALITY_KEYS, *AUDIO_QUALITY_KEYS]
    columns = list(METRIC_COLUMNS)
    for key in quality_keys:
        if any(run.final(key) is not None for run in runs):
            header, better = QUALITY_COLUMNS[key]
            columns.append((header, key, better, key))
    return columns


def best_values(runs: list[RunData], columns: list[tuple[str, str, str, str]]) -> dict[str, float]:
    """The best final value per metric column (only when at least two runs have one)."""
    best = {}
    for _, key, better, _ in columns:
        values = [v for v in (run.final(key) for run in runs) if v is not None]
        if len(values) >= 2:
            best[key] = max(values) if better == "max" else min(values)
    return best


def final_table(runs: list[RunData], colors: dict[str, Any]) -> str:
    """The HTML table of final numbers per run."""
    columns = table_columns(runs)
    best = best_values(runs, columns)
    with_status = any(run.status for run in runs)
    head = ["run", "quantizer", "K", "η", "settings", "steps"] + [c[0] for c in columns]
    head += ["status", "time"] if with_status else []
    text_columns = {"run", "quantizer", "settings", "status"}
    tips = {c[0]: c[3] for c in columns}
    cells = "".join(
        f'<th class="{"text" if h in text_columns else ""}" title="{html.escape(tips.get(h, ""))}">{html.escape(h)}</th>'
        for h in head
    )
    lines = [f'<div class="table-wrap"><table><thead><tr>{cells}</tr></thead><tbody>']
    for run in runs:
        q = run.quantizer
        swatch = f'<span class="swatch" style="background:{_hex(colors[run.label])}"></span>'
        row = [
            f'<td class="text">{swatch}{html.escape(run.label)}</td>',
            f'<td class="text">{html.escape(q.name)}</td>',
            f"<td>{format_number(q.codebook_size)}</td>",
            f"<td>{format_number(q.eta)}</td>",
            f'<td class="text">{html.escape(q.extra()) or "–"}</td>',
            f"<td>{format_number(run.last_step)}</td>",
        ]
        for _, key, _, _ in columns:
            value = run.final(key)
            marker = ' class="best"' if value is not None and best.get(key) == value else ""
            row.append(f"<td{marker}>{format_number(value)}</td>")
        if with_status:
            status = run.status or "–"
            row.append(f'<td class="text status-{html.escape(status)}">{html.escape(status)}</td>')
            row.append(f"<td>{format_duration(run.wall_time)}</td>")
        lines.append("<tr>" + "".join(row) + "</tr>")
    lines.append("</tbody></table></div>")
    return "\n".join(lines)


def section(title: str, note: str, body: str) -> str:
    note_html = f'<p class="note">{note}</p>' if note else ""
    return f"<section><h2>{html.escape(title)}</h2>{note_html}{body}</section>"


def render_report(runs: list[RunData], title: str = "Token utilization report", sources: list[str] | None = None) -> str:
    """The complete HTML document for these runs.

    Args:
        runs: the runs to compare (any order; shown grouped by quantizer, then K and eta).
        title: page title.
        sources: the paths the runs were read from (listed at the bottom).
    Returns:
        One self-contained HTML string (inline SVG and CSS, no script, no external reference).
    """
    from vp_lightning.tracking import plots

    runs = sort_runs(runs)
    colors = plots.run_colors(runs)
    quantizers = sorted({run.quantizer.name for run in runs})
    stamp = datetime.now().strftime("%Y-%m-%d %H:%M")
    parts = [
        section(
            "Token usage over training",
            "Measured on the whole validation set at every validation. CVU = exp(entropy of token frequencies) / K "
            "(1 = all codes equally used); VP-VAE tokens come from the k-means codebook fitted before each "
            "validation (and once more, on training latents, after the last step).",
            f'<div class="figure">{plots.figure_svg(plots.usage_over_training(runs, colors), "usage")}</div>',
        ),
        section(
            "Final token usage",
            "Last validation of each run. Dotted marks: the codebook size K.",
            f'<div class="figure">{plots.figure_svg(plots.final_usage_bars(runs, colors), "bars")}</div>',
        ),
    ]
    frequencies = plots.code_frequencies(runs, colors)
    if frequencies is not None:
        parts.append(section(
            "Code frequencies",
            "Frequency of every code times K, codes sorted from most to least used (x = share of the codebook, so "
            "runs with different K align). A collapsed codebook drops to zero early; uniform use is the dashed line.",
            f'<div class="figure">{plots.figure_svg(frequencies, "freq")}</div>',
        ))
    parts.append(section(
        "Perturbation scale vs quality vs token usage",
        "Parallel coordinates, each axis scaled to the runs' range (values at the ends). Runs without a value on "
        "an axis (VQ-VAE and FSQ have no η) sit on its n/a mark.",
        f'<div class="figure">{plots.figure_svg(plots.parallel_coordinates(runs, colors), "parallel")}</div>',
    ))
    parts.append(section(
        "Final numbers",
        "Last logged value of each metric; the best value of each column is highlighted.",
        final_table(runs, colors),
    ))
    source_html = ""
    if sources:
        source_html = '<p class="sources">Read from: ' + ", ".join(html.escape(s) for s in sources) + "</p>"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title>
<style>{CSS}</style></head>
<body>
<header><h1>{html.escape(title)}</h1>
<p>{len(runs)} runs · {html.escape(", ".join(quantizers))} · generated {stamp} by vp-lightning report</p></header>
<main>
{"".join(parts)}
{source_html}
</main></body></html>
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vp-lightning report",
        description="Write one self-contained HTML dashboard comparing token utilization across runs "
        "(reads config.yaml + metrics.csv + token counts; no network).",
    )
    parser.add_argument("paths", nargs="+", type=Path,
                        help="run folders (runs/<name>/version_N), sweep folders (runs/sweeps/<name>-<id>) or "
                        "folders that contain runs")
    parser.add_argument("-o", "--output", type=Path, default=Path("report.html"), help="HTML file to write")
    parser.add_argument("--title", default="Token utilization report", help="page title")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``vp-lightning report``: see :func:`build_parser`. Returns the process exit code."""
    args = build_parser().parse_args(argv)
    try:
        runs = find_runs(args.paths)
        page = render_report(runs, title=args.title, sources=[str(p) for p in args.paths])
    except UserError as err:
        print(f"vp-lightning report: error: {err}", file=sys.stderr)
        return 2
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(page, encoding="utf-8")
    print(f"wrote {args.output} ({len(runs)} runs, {len(page) / 1024:.0f} KiB)")
    return 0
