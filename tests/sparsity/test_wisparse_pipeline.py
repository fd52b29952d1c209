"""The calibration job end to end on a tiny random Llama under a Lightning Trainer (CPU), resuming, and
statistics merged over ranks (two shards in one process; two real gloo processes in the slow test)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from vp_lightning.sparsity import WiSparseCalibration, WiSparseTextData, load_plan
from vp_lightning.sparsity.loading import LLAMA_LAYOUT, TINY_LLAMA_CONFIG, projection_sites, tiny_llama
from vp_lightning.sparsity.scores import LogBins
from vp_lightning.sparsity.statistics import ScoreStatistics, collect_statistics

REPO = Path(__file__).resolve().parents[2]


def _module(output_dir: Path) -> WiSparseCalibration:
    return WiSparseCalibration(
        random_config=TINY_LLAMA_CONFIG,
        output_dir=str(output_dir),
        target_sparsity=0.5,
        eval_sparsities=[0.25, 0.5],
        alpha_sparsities=[0.25, 0.5, 0.75],
        histogram_bins=512,
        reference_sequences=2,
        alpha_tokens=128,
        greedy_step=0.05,
        greedy_max_sparsity=0.8,
        threshold_correction_sequences=2,
    )


def _data() -> WiSparseTextData:
    return WiSparseTextData(tokenizer="bytes", sequence_length=64, calibration_sequences=7,
                            fitness_sequences=2, evaluation_sequences=4, batch_size=2)


def _fit(output_dir: Path, **trainer_kwargs) -> WiSparseCalibration:
    module = _module(output_dir)
    trainer = L.Trainer(accelerator="cpu", devices=trainer_kwargs.pop("devices", 1), max_epochs=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        **trainer_kwargs)
    trainer.fit(module, datamodule=_data())
    return module


def test_statistics_of_two_shards_merge_to_the_single_pass():
    model = tiny_llama()
    sites = projection_sites(model, LLAMA_LAYOUT)
    ids = torch.randint(0, 256, (6, 32), generator=torch.Generator().manual_seed(0))
    alphas, bins = [0.0, 0.5, 1.0], LogBins(num_bins=256)
    whole = collect_statistics(model, ScoreStatistics.for_model(model, sites, alphas, bins), [ids[:3], ids[3:]])
    shards = [collect_statistics(model, ScoreStatistics.for_model(model, sites, alphas, bins), [ids[r::2]])
              for r in range(2)]
    merged = shards[0].merge_(shards[1])
    for site in sites:
        assert torch.equal(merged.counts[site.name], whole.counts[site.name])
    assert merged.tokens() == whole.tokens() == 6 * 32
    # all_reduce_ with a sum over "ranks" gives the same result
    other = shards[1]
    reduced = ScoreStatistics.for_model(model, sites, alphas, bins)
    reduced.counts = {name: c.clone() for name, c in collect_statistics(
        model, ScoreStatistics.for_model(model, sites, alphas, bins), [ids[0::2]]).counts.items()}
    reduced.all_reduce_(lambda flat: flat + torch.cat([other.counts[s.name].flatten() for s in sites]))
    for site in sites:
        assert torch.equal(reduced.counts[site.name], whole.counts[site.name])


def test_end_to_end_fit_writes_plans_and_results_and_resumes(tmp_path):
    module = _fit(tmp_path)
    for name in ("statistics.json", "statistics.safetensors", "alpha.json", "plan.json", "plan.safetensors",
                 "results.md", "results.csv", "results.json", "greedy/block_000.json", "greedy/block_001.json"):
        assert (tmp_path / name).is_file(), name
    results = json.loads((tmp_path / "results.json").read_text())
    rows = {(r["method"], r["target"]): r for r in results["results"]}
    assert set(rows) == {("dense", 0.0)} | {(m, t) for m in WiSparseCalibration.METHODS for t in (0.25, 0.5)}
    assert "all positions" in results["convention"]
    assert rows[("dense", 0.0)]["kl"] == 0.0
    for (method, target), row in rows.items():
        if method != "dense":
            assert row["kl"] > 0
            assert abs(row["realised"] - target) < 0.05, (method, target, row["realised"])
    plan = load_plan(tmp_path / "plan.json")
    assert plan.metadata["method"] == "wisparse-alpha-greedy"
    assert plan.parameter_weighted_sparsity() == pytest.approx(0.5, abs=1e-6)
    assert set(plan.layers) == {site.name for site in module.sites}
    teal = load_plan(tmp_path / "plans" / "teal-0.50.json")
    assert {layer.alpha for layer in teal.layers.values()} == {0.0}
    for layer in teal.layers.values():  # alpha 0: one scalar threshold per projection, as in TEAL
        assert torch.all(layer.threshold == torch.tensor(layer.tau, dtype=torch.float32))
    assert set(results["alpha_at_target"]) == set(plan.layers)
    for b, table in module.tables.items():
        rows_ = torch.tensor(table.sparsities)
        assert bool((rows_[1:] >= rows_[:-1]).all()), b

    # a second run with the same settings loads every stage instead of recomputing it
    kept = [tmp_path / "statistics.safetensors", *sorted((tmp_path / "greedy").iterdir())]
    stamps = [p.stat().st_mtime_ns for p in kept]
    again = _fit(tmp_path)
    assert again._stats_loaded
    assert [p.stat().st_mtime_ns for p in kept] == stamps
    assert json.loads((tmp_path / "results.json").read_text())["results"] == results["results"]

    # a changed evaluation setting recomputes only the evaluation
    changed = _module(tmp_path)
    changed.dense_prefix = 8
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(changed, datamodule=_data())
    assert changed._stats_loaded
    assert "dense prefix 8" in (tmp_path / "results.md").read_text()


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tmp_path):
    single, double = tmp_path / "one", tmp_path / "two"
    _fit(single)
    _fit(double, devices=2, strategy="ddp_spawn")
    one = load_file(str(single / "statistics.safetensors"))
    two = load_file(str(double / "statistics.safetensors"))
    assert one.keys() == two.keys()
    for key in one:
        assert torch.equal(one[key], two[key]), key
    plan_one, plan_two = load_plan(single / "plan.json"), load_plan(double / "plan.json")
    for name, layer in plan_one.layers.items():
        assert layer.alpha == plan_two.layers[name].alpha
        assert layer.sparsity == pytest.approx(plan_two.layers[name].sparsity)
        assert torch.allclose(layer.threshold, plan_two.layers[name].threshold)
    res_one = json.loads((single / "results.json").read_text())["results"]
    res_two = json.loads((double / "results.json").read_text())["results"]
    for a, b in zip(res_one, res_two, strict=True):
        assert a["perplexity"] == pytest.approx(b["perplexity"], rel=1e-4)
        assert a["realised"] == pytest.approx(b["realised"], abs=1e-6)


@pytest.mark.slow
def test_cli_runs_the_tiny_config(tmp_path):
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    # the config's relative paths (output_dir, logger save_dir) land in the working directory
    command = [sys.executable, "-m", "vp_lightning", "fit", "--config", str(REPO / "conf/wisparse/tiny.yaml")]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = tmp_path / "runs" / "wisparse" / "tiny" / "results.md"
    assert "wisparse-alpha-greedy" in results.read_text()
