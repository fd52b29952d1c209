"""W&B token-utilization dashboard in code: ``vp-lightning dashboard --entity E --project P [--push]``.

Builds, with ``wandb-workspaces`` (``pip install wandb-workspaces``), a W&B *workspace* and a *report* that compare
runs of the project's tokenizers:

* token usage over training: ``val/codebook/{cvu,perplexity,utilization,dead_codes}`` against
  ``trainer/global_step``, grouped by quantizer (``model.init_args.quantizer.class_path``), mean with min-max band;
* final CVU and perplexity bar charts per quantizer;
* parallel coordinates of eta vs reconstruction/quality vs CVU, and a CVU-vs-eta scatter plot;
* quality over training (``val/loss/rec`` and PSNR/SSIM or PESQ/STOI).

Without ``--push`` nothing leaves the machine: the objects are built and summarised (``--output spec.json`` writes
the workspace spec). ``--push`` saves both to the W&B server and needs a login (``wandb login``).
Config keys are the nested resolved config every run logs (``model.init_args.quantizer...``), so the panels work for
plain runs, ``wandb agent`` sweep runs and offline runs uploaded with ``wandb sync`` alike.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vp_lightning.errors import UserError

QUANTIZER_KEY = "model.init_args.quantizer.class_path"
ETA_KEY = "model.init_args.quantizer.init_args.eta"
STEP_KEY = "trainer/global_step"  # Lightning's WandbLogger logs every metric against this
USAGE = [
    ("val/codebook/cvu", "CVU (perplexity / K)"),
    ("val/codebook/perplexity", "perplexity (effective codes)"),
    ("val/codebook/utilization", "utilization (share of codes used)"),
    ("val/codebook/dead_codes", "dead codes"),
]
QUALITY = {
    "image": [("val/psnr", "PSNR"), ("val/ssim", "SSIM")],
    "audio": [("val/pesq", "PESQ"), ("val/stoi", "STOI")],
}


def _libraries():
    try:
        import wandb_workspaces.reports.v2 as wr
        import wandb_workspaces.workspaces as ws
        from wandb_workspaces import expr
    except ImportError as err:
        raise UserError(
            f"the W&B dashboard needs the wandb-workspaces package ({err}); install it with "
            "`pip install wandb-workspaces` (or `pip install vp-lightning[dashboards]`)"
        ) from err
    return wr, ws, expr


@dataclass
class Dashboard:
    """The built W&B objects: a ``wandb_workspaces`` Workspace and Report (unsaved)."""

    workspace: Any
    report: Any


def usage_panels(wr) -> list:
    """Line plots of the four token-usage keys over steps, grouped by quantizer."""
    return [
        wr.LinePlot(title=title, x=STEP_KEY, y=[key], groupby=wr.Config(QUANTIZER_KEY), groupby_aggfunc="mean",
                    groupby_rangefunc="minmax", title_x="training step", title_y=key.rsplit("/", 1)[-1])
        for key, title in USAGE
    ]


def final_panels(wr) -> list:
    """Bar charts of the final (summary) CVU and perplexity per quantizer."""
    return [
        wr.BarPlot(title="final CVU per quantizer", metrics=["val/codebook/cvu"], groupby=wr.Config(QUANTIZER_KEY),
                   groupby_aggfunc="mean", groupby_rangefunc="minmax", orientation="v"),
        wr.BarPlot(title="final perplexity per quantizer", metrics=["val/codebook/perplexity"],
                   groupby=wr.Config(QUANTIZER_KEY), groupby_aggfunc="mean", groupby_rangefunc="minmax",
                   orientation="v"),
    ]


def eta_panels(wr, modality: str) -> list:
    """Parallel coordinates eta → reconstruction → quality → CVU, and CVU against eta."""
    columns = [wr.ParallelCoordinatesPlotColumn(metric=wr.Config(ETA_KEY), display_name="eta")]
    columns.append(wr.ParallelCoordinatesPlotColumn(metric=wr.SummaryMetric("val/loss/rec"), display_name="rec. loss"))
    for key, title in QUALITY[modality]:
        columns.append(wr.ParallelCoordinatesPlotColumn(metric=wr.SummaryMetric(key), display_name=title))
    columns.append(wr.ParallelCoordinatesPlotColumn(metric=wr.SummaryMetric("val/codebook/cvu"), display_name="CVU"))
    return [
        wr.ParallelCoordinatesPlot(title="eta vs quality vs CVU", columns=columns),
        wr.ScatterPlot(title="CVU against eta", x=wr.Config(ETA_KEY), y=wr.SummaryMetric("val/codebook/cvu")),
    ]


def quality_panels(wr, modality: str) -> list:
    """Reconstruction and quality metrics over steps, grouped by quantizer."""
    keys = [("val/loss/rec", "reconstruction loss"), *QUALITY[modality]]
    return [
        wr.LinePlot(title=title, x=STEP_KEY, y=[key], groupby=wr.Config(QUANTIZER_KEY), groupby_aggfunc="mean",
                    groupby_rangefunc="minmax", title_x="training step")
        for key, title in keys
    ]


def run_filters(expr, group: str | None, tags: list[str]) -> list:
    """Runset filters: a W&B group (e.g. a sweep's group) and tags (all must match)."""
    filters = []
    if group:
        filters.append(expr.Metric("Group") == group)
    for tag in tags:
        filters.append(expr.Tags().isin([tag]))
    return filters


def build_dashboard(entity: str, project: str, name: str = "Token utilization", modality: str = "image",
                    group: str | None = None, tags: list[str] | None = None) -> Dashboard:
    """Builds the workspace and the report (no network).

    Args:
        entity: W&B entity (user or team).
        project: W&B project the runs are in.
        name: workspace name / report title.
        modality: ``image`` (PSNR/SSIM) or ``audio`` (PESQ/STOI) quality panels.
        group: only runs of this W&B group (a sweep run by ``vp-lightning sweep`` uses its folder name).
        tags: only runs carrying all these tags.
    Returns:
        A :class:`Dashboard` whose ``workspace.save()`` / ``report.save()`` create them on the server.
    """
    if modality not in QUALITY:
        raise UserError(f"modality must be one of {sorted(QUALITY)}, got {modality!r}")
    wr, ws, expr = _libraries()
    filters = run_filters(expr, group, list(tags or []))
    sections = [
        ("Token usage over training", usage_panels(wr)),
        ("Final token usage", final_panels(wr)),
        ("Perturbation scale vs quality vs CVU", eta_panels(wr, modality)),
        ("Quality over training", quality_panels(wr, modality)),
    ]
    workspace = ws.Workspace(
        entity=entity, project=project, name=name,
        sections=[ws.Section(name=title, panels=panels, is_open=True) for title, panels in sections],
        settings=ws.WorkspaceSettings(x_axis=STEP_KEY, max_runs=50),
        runset_settings=ws.RunsetSettings(filters=filters, groupby=[expr.Config(QUANTIZER_KEY)]),
    )
    blocks = [
        wr.H1(text=name),
        wr.P(text="Token utilization of the tokenizers in this project: CVU = exp(entropy of token frequencies) / K "
             "over the whole validation set (1 = every code used equally), perplexity, utilization and dead codes, "
             "grouped by quantizer, against reconstruction quality and the perturbation scale eta."),
    ]
    for title, panels in sections:
        blocks.append(wr.H2(text=title))
        blocks.append(wr.PanelGrid(
            runsets=[wr.Runset(entity=entity, project=project, name="runs", filters=filters, groupby=[QUANTIZER_KEY])],
            panels=panels,
        ))
    report = wr.Report(entity=entity, project=project, title=name, blocks=blocks,
                       description="Token utilization across quantizers (built by vp-lightning dashboard)")
    return Dashboard(workspace=workspace, report=report)


def workspace_spec(dashboard: Dashboard) -> dict[str, Any]:
    """The workspace as the JSON spec W&B stores (built offline)."""
    return dashboard.workspace._to_model().model_dump(by_alias=True, exclude_none=True, mode="json")


def report_outline(dashboard: Dashboard) -> list[dict[str, Any]]:
    """The report's blocks and panel specs (run sets are resolved only when saving, on the server)."""
    outline = []
    for block in dashboard.report.blocks:
        item: dict[str, Any] = {"block": type(block).__name__}
        if hasattr(block, "text"):
            item["text"] = block.text
        if hasattr(block, "panels"):
            item["panels"] = [
                panel._to_model().model_dump(by_alias=True, exclude_none=True, mode="json") for panel in block.panels
            ]
        outline.append(item)
    return outline


def describe(dashboard: Dashboard) -> str:
    """A short text listing of the workspace sections and their panels."""
    lines = [f"workspace '{dashboard.workspace.name}' in {dashboard.workspace.entity}/{dashboard.workspace.project}:"]
    for section in dashboard.workspace.sections:
        titles = ", ".join(getattr(panel, "title", None) or type(panel).__name__ for panel in section.panels)
        lines.append(f"  {section.name}: {titles}")
    lines.append(f"report '{dashboard.report.title}': {len(dashboard.report.blocks)} blocks")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vp-lightning dashboard",
        description="Build a W&B workspace and report comparing token utilization across runs (wandb-workspaces). "
        "Only --push contacts the W&B server.",
    )
    parser.add_argument("--entity", required=True, help="W&B entity (user or team)")
    parser.add_argument("--project", required=True, help="W&B project holding the runs")
    parser.add_argument("--name", default="Token utilization", help="workspace name and report title")
    parser.add_argument("--modality", choices=sorted(QUALITY), default="image",
                        help="quality panels: image (PSNR/SSIM) or audio (PESQ/STOI)")
    parser.add_argument("--group", default=None, help="only runs of this W&B group (e.g. a sweep folder name)")
    parser.add_argument("--tag", action="append", default=[], help="only runs with this tag (repeatable)")
    parser.add_argument("--output", type=Path, default=None,
                        help="write the workspace spec and report outline as JSON (offline inspection)")
    parser.add_argument("--push", action="store_true", help="save the workspace and the report on the W&B server")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``vp-lightning dashboard``: see :func:`build_parser`. Returns the process exit code."""
    args = build_parser().parse_args(argv)
    try:
        dashboard = build_dashboard(args.entity, args.project, args.name, args.modality, args.group, args.tag)
        print(describe(dashboard))
        if args.output is not None:
            spec = {"workspace": workspace_spec(dashboard), "report": report_outline(dashboard)}
            args.output.parent.mkdir(parents=True, exist_ok=True)
            args.output.write_text(json.dumps(spec, indent=2), encoding="utf-8")
            print(f"wrote {args.output}")
        if args.push:
            from vp_lightning.cli import wandb_logged_in

            if not wandb_logged_in():
                raise UserError("--push needs a W&B login: run `wandb login` (or set WANDB_API_KEY) and retry")
            dashboard.workspace.save()
            dashboard.report.save()
            print(f"saved workspace: {dashboard.workspace.url}\nsaved report: {dashboard.report.url}")
        else:
            print("not pushed (add --push to save them on the W&B server)")
    except UserError as err:
        print(f"vp-lightning dashboard: error: {err}", file=sys.stderr)
        return 2
    return 0
