"""Every sweep file: valid for W&B's own schema, runnable by `wandb agent` and the offline runner, and every
parameter key reaches the CLI config with its sampled value (checked by resolving the command with --print_config)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vp_lightning.tracking.command import build_command, vp_lightning_arguments
from vp_lightning.tracking.sweep_runner import load_sweep_config, sample_parameters, sweeps_library

ROOT = Path(__file__).resolve().parents[1]
SWEEP_FILES = sorted((ROOT / "sweeps").glob("*.yaml"))
IDS = [p.name for p in SWEEP_FILES]
# keys a run logs exactly once per validation (hyperband counts logged values, bayes reads them)
PER_VALIDATION_METRICS = {"val/loss/rec", "val/codebook/cvu", "val/codebook/perplexity", "val/psnr", "val/pesq"}


def referenced_configs(config):
    """The conf/ files a sweep uses: in its command and as values of a `config` parameter."""
    files = []
    command = config.get("command") or []
    files += [command[i + 1] for i, item in enumerate(command[:-1]) if item == "--config"]
    spec = config["parameters"].get("config", {})
    files += spec.get("values", []) + ([spec["value"]] if "value" in spec else [])
    return files


def test_there_are_sweeps_for_every_study():
    names = {p.stem for p in SWEEP_FILES}
    for required in ("image-vpvae-eta", "audio-vpvae-eta", "image-fsp-eta", "image-fsq-noise", "image-quantizers",
                     "quickstart-vpvae-eta", "quickstart-fsp-eta", "quickstart-fsq-noise", "quickstart-quantizers"):
        assert required in names


@pytest.mark.parametrize("path", SWEEP_FILES, ids=IDS)
def test_schema_and_shape(path):
    config = yaml.safe_load(path.read_text())
    assert sweeps_library().schema_violations_from_proposed_config(config) == []
    assert load_sweep_config(path) == config  # the runner's own checks agree
    command = config["command"]
    assert command[:5] == ["${env}", "python", "-m", "vp_lightning", "fit"] and command[-1] == "${args}"
    assert config["metric"]["name"] in PER_VALIDATION_METRICS
    for key in config["parameters"]:
        assert key == "config" or "." in key or key == "seed_everything", key  # flat dotted LightningCLI keys
    if config["method"] in ("bayes",):
        assert "early_terminate" in config  # long bayes searches stop hopeless runs
    if "early_terminate" in config:
        assert config["early_terminate"]["type"] == "hyperband"
    # the command expands the way `wandb agent` expands it, with the sampled values as --key=value
    parameters = sample_parameters(config)[0]
    expanded = build_command(command, parameters)
    assert expanded[0] == "/usr/bin/env" and expanded[1] == sys.executable
    assert vp_lightning_arguments(expanded)[1] == "fit"
    assert [a for a in expanded if a.startswith("--") and "=" in a] == [f"--{k}={v}" for k, v in parameters.items()]


def test_quickstart_variants_use_quickstart_configs():
    for path in SWEEP_FILES:
        config = yaml.safe_load(path.read_text())
        uses_quickstart = all("conf/quickstart/" in f for f in referenced_configs(config))
        assert uses_quickstart == path.name.startswith("quickstart-"), path.name


def test_quantizer_grids_compare_four_quantizers_at_equal_k():
    for name in ("image-quantizers", "audio-quantizers", "quickstart-quantizers", "quickstart-audio-quantizers"):
        config = yaml.safe_load((ROOT / "sweeps" / f"{name}.yaml").read_text())
        assert config["method"] == "grid"
        values = config["parameters"]["config"]["values"]
        assert [Path(v).stem.rsplit("-", 1)[-1] for v in values] == ["vqvae", "fsq", "fsp", "vpvae"]
        for value in values:
            if (ROOT / value).is_file():
                quantizer = yaml.safe_load((ROOT / value).read_text())["model"]["init_args"]["quantizer"]["init_args"]
                k = quantizer.get("codebook_size") or __import__("math").prod(quantizer["levels"])
                assert k in (1000, 1024), (value, k)  # the paper's K = 1024 row: FSQ/FSP levels [8,5,5,5] = 1000


CHECKER = """
import json, sys, warnings
warnings.filterwarnings("ignore")
from vp_lightning.tracking.sweep_runner import check_sweep, load_sweep_config
out = {}
for path in sys.argv[1:]:
    out[path] = check_sweep(load_sweep_config(path))
print("RESULT" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def cli_check():
    """One subprocess resolves every runnable sweep file's sampled parameter sets with the real CLI."""
    runnable = [str(p.relative_to(ROOT)) for p in SWEEP_FILES
                if all((ROOT / f).is_file() for f in referenced_configs(yaml.safe_load(p.read_text())))]
    proc = subprocess.run([sys.executable, "-c", CHECKER, *runnable], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.split("RESULT", 1)[1])


@pytest.mark.parametrize("path", SWEEP_FILES, ids=IDS)
def test_every_parameter_key_is_accepted_by_the_cli(path, cli_check):
    config = yaml.safe_load(path.read_text())
    missing = [f for f in referenced_configs(config) if not (ROOT / f).is_file()]
    if missing:
        pytest.skip(f"{path.name} uses {', '.join(missing)}, which does not exist in conf/ yet")
    assert cli_check[str(path.relative_to(ROOT))] == []


def test_checker_catches_a_wrong_key(tmp_path):
    """The CLI check can fail: a misspelt key is reported with the CLI's message."""
    from vp_lightning.tracking.sweep_runner import check_sweep

    config = {
        "method": "grid", "metric": {"name": "val/loss/rec", "goal": "minimize"},
        "command": ["${env}", "python", "-m", "vp_lightning", "fit", "--config",
                    str(ROOT / "conf/quickstart/image-fsq.yaml"), "${args}"],
        "parameters": {"model.init_args.quantizer.init_args.noise_rat": {"values": [0.5]}},
    }
    problems = check_sweep(config)
    assert len(problems) == 1 and "noise_rat" in problems[0]
