"""Every shipped config parses, and every quickstart config trains briefly (style: configs are exercised)."""

import contextlib
import io
from pathlib import Path

import pytest
import yaml

from vp_lightning.cli import VPLightningCLI

ROOT = Path(__file__).resolve().parents[1]
# conf/wisparse/search.yaml adds the allocation search to a model config; it is not a run config on its own
SEARCH_SNIPPET = ROOT / "conf" / "wisparse" / "search.yaml"
RUN_CONFIGS = sorted(p for p in (ROOT / "conf").rglob("*.yaml") if "quantizer" not in p.parts and p != SEARCH_SNIPPET)
SNIPPETS = sorted((ROOT / "conf" / "quantizer").glob("*.yaml"))
IMAGE_QUICKSTARTS = sorted((ROOT / "conf" / "quickstart").glob("image-*.yaml"))


def print_config(*args: str) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        VPLightningCLI(args=["fit", *args, "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(out.getvalue())


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "conf")))
def test_config_parses(path):
    config = print_config("--config", str(path))
    assert config["model"]["class_path"].startswith("vp_lightning.")
    assert config["data"]["class_path"].startswith("vp_lightning.")


@pytest.mark.parametrize("path", SNIPPETS, ids=lambda p: p.name)
def test_quantizer_snippet_swaps_the_quantizer(path):
    snippet = yaml.safe_load(path.read_text())["model"]["init_args"]["quantizer"]
    config = print_config("--config", str(ROOT / "conf" / "quickstart" / "image-fsq.yaml"), "--config", str(path))
    assert config["model"]["init_args"]["quantizer"]["class_path"] == snippet["class_path"]


def test_image_quickstarts_differ_only_in_quantizer_and_its_callback():
    def strip(cfg):
        cfg = yaml.safe_load(cfg.read_text())
        cfg["model"]["init_args"].pop("quantizer")
        cfg["trainer"]["callbacks"] = [c for c in cfg["trainer"]["callbacks"] if "CodebookFitting" not in c["class_path"]]
        for logger in cfg["trainer"]["logger"]:
            logger["init_args"].pop("name", None)
            logger["init_args"].pop("tags", None)
        return cfg

    reference = strip(IMAGE_QUICKSTARTS[0])
    for path in IMAGE_QUICKSTARTS[1:]:
        assert strip(path) == reference, path.name


@pytest.mark.slow
@pytest.mark.parametrize("path", IMAGE_QUICKSTARTS, ids=lambda p: p.name)
def test_image_quickstart_trains_briefly(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = VPLightningCLI(args=["fit", "--config", str(path), "--trainer.max_steps=2", "--trainer.val_check_interval=2",
                               "--trainer.limit_val_batches=2", "--data.init_args.resolution=16",
                               "--data.init_args.num_workers=0", "--trainer.enable_progress_bar=false"])
    assert cli.trainer.global_step == 2
    assert "val/codebook/perplexity" in cli.trainer.callback_metrics


def test_search_snippet_adds_the_search_and_per_generation_checkpoints_to_a_model_config():
    config = print_config("--config", str(ROOT / "conf" / "wisparse" / "smollm2.yaml"), "--config", str(SEARCH_SNIPPET))
    search = config["model"]["init_args"]["search"]
    assert search["generations"] == 25 and search["random_baseline"] is True
    assert config["model"]["init_args"]["output_dir"] == "runs/wisparse/smollm2"  # the model config's stages are reused
    assert config["trainer"]["enable_checkpointing"] is True
    callbacks = [c["class_path"] for c in config["trainer"]["callbacks"]]
    assert "lightning.pytorch.callbacks.ModelCheckpoint" in callbacks
