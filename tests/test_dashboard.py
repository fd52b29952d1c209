"""W&B dashboard in code: built offline with wandb-workspaces; only --push may touch the server."""

import json

import pytest

pytest.importorskip("wandb_workspaces", reason="wandb-workspaces not installed (pip install wandb-workspaces)")

from vp_lightning.errors import UserError  # noqa: E402
from vp_lightning.tracking import dashboard  # noqa: E402


@pytest.fixture(autouse=True)
def no_server(monkeypatch):
    """Any attempt to reach the W&B API fails the test."""
    import wandb

    def refuse(*args, **kwargs):
        raise AssertionError("the dashboard contacted the W&B server without --push")

    monkeypatch.setattr(wandb, "Api", refuse)


def panels_of(built):
    return {section.name: section.panels for section in built.workspace.sections}


def test_workspace_panels_and_spec_offline():
    built = dashboard.build_dashboard("team", "vp-lightning", group="quickstart-vpvae-eta-ab12cd34", tags=["sweep"])
    sections = panels_of(built)
    assert list(sections) == ["Token usage over training", "Final token usage",
                              "Perturbation scale vs quality vs CVU", "Quality over training"]
    usage = sections["Token usage over training"]
    assert [p.y for p in usage] == [["val/codebook/cvu"], ["val/codebook/perplexity"], ["val/codebook/utilization"],
                                    ["val/codebook/dead_codes"]]
    assert all(p.x == "trainer/global_step" for p in usage)
    spec = json.dumps(dashboard.workspace_spec(built))
    # grouped by the quantizer class of the nested run config; eta read from the same config
    assert '"groupBy": "model.value.init_args.quantizer.class_path"' in spec
    assert "config:model.value.init_args.quantizer.init_args.eta" in spec
    assert '"viewType": "Parallel Coordinates Plot"' in spec and '"viewType": "Bar Chart"' in spec
    assert "summary:val/codebook/cvu" in spec and "summary:val/psnr" in spec
    runset = dashboard.workspace_spec(built)["spec"]["section"]["runSets"][0]
    assert runset["filters"]["filters"][0]["value"] == "quickstart-vpvae-eta-ab12cd34"
    assert runset["filters"]["filters"][1]["value"] == ["sweep"]


def test_report_blocks_offline():
    built = dashboard.build_dashboard("team", "proj", name="Tokens", modality="audio")
    outline = dashboard.report_outline(built)
    assert [b["block"] for b in outline][:3] == ["H1", "P", "H2"]
    grids = [b for b in outline if b["block"] == "PanelGrid"]
    assert len(grids) == 4
    text = json.dumps(outline)
    assert "val/pesq" in text and "val/stoi" in text and "val/psnr" not in text
    assert built.report.title == "Tokens" and built.report.entity == "team"


def test_bad_modality_is_a_user_error():
    with pytest.raises(UserError, match="modality"):
        dashboard.build_dashboard("e", "p", modality="video")


def test_command_builds_and_writes_without_pushing(tmp_path, capsys):
    out = tmp_path / "dash.json"
    assert dashboard.main(["--entity", "e", "--project", "p", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Token usage over training" in printed and "not pushed" in printed
    spec = json.loads(out.read_text())
    assert spec["workspace"]["project"] == "p" and spec["report"][0]["block"] == "H1"


def test_push_without_login_fails_clearly(monkeypatch, capsys):
    import vp_lightning.cli

    monkeypatch.setattr(vp_lightning.cli, "wandb_logged_in", lambda: False)
    assert dashboard.main(["--entity", "e", "--project", "p", "--push"]) == 2
    assert "wandb login" in capsys.readouterr().err


def test_push_saves_both(monkeypatch, capsys):
    import vp_lightning.cli

    saved = []
    monkeypatch.setattr(vp_lightning.cli, "wandb_logged_in", lambda: True)
    built = dashboard.build_dashboard("e", "p")
    for obj in (built.workspace, built.report):
        object.__setattr__(obj, "save", lambda obj=obj: saved.append(type(obj).__name__))
    monkeypatch.setattr(dashboard, "build_dashboard", lambda *a, **k: built)
    monkeypatch.setattr(type(built.workspace), "url", property(lambda self: "https://wandb.ai/e/p?w"), raising=False)
    monkeypatch.setattr(type(built.report), "url", property(lambda self: "https://wandb.ai/e/p/reports/r"),
                        raising=False)
    assert dashboard.main(["--entity", "e", "--project", "p", "--push"]) == 0
    assert saved == ["Workspace", "Report"]
