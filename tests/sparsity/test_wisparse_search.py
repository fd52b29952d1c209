"""The across-block allocation search: budget-preserving genomes, racing selection, the cached fitness, and the
search as a Lightning job (checkpointed state, 2 gloo processes, SIGKILL + ``--ckpt_path last``)."""

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from kill_helpers import run_until_marker_then_sigkill

from vp_lightning.sparsity import FixedAllocation, WiSparseCalibration, WiSparseTextData
from vp_lightning.sparsity.errors import SparsityConfigError
from vp_lightning.sparsity.fitness import FitnessEvaluator
from vp_lightning.sparsity.layers import SparseLinear, set_sparsity_enabled, set_threshold
from vp_lightning.sparsity.loading import LLAMA_LAYOUT, decoder_blocks, projection_sites, tiny_llama
from vp_lightning.sparsity.search import (
    AllocationSearch,
    LevelBounds,
    SearchConfig,
    block_sparsities,
    mutate,
    random_genome,
    split_work,
)

REPO = Path(__file__).resolve().parents[2]
SIX_BLOCKS = {"num_hidden_layers": 6, "initializer_range": 0.3}


# ------------------------------------------------------------------------------------------ genomes
def test_every_mutant_and_random_genome_keeps_the_average_sparsity_at_the_target():
    target, step = 0.5, 0.025
    caps = [0.9, 0.75, 0.9, 0.6, 0.9, 0.9, 0.8, 0.9]
    bounds = LevelBounds.for_target(target, step, caps)
    params = [1000] * len(caps)
    rng = random.Random(0)
    genome = tuple([0] * len(caps))
    seen = set()
    for _ in range(2000):
        genome = mutate(genome, rng, bounds, max_moves=3)
        seen.add(genome)
        assert sum(genome) == 0 and bounds.contains(genome)
        sparsities = block_sparsities(genome, target, step)
        assert all(0.0 <= s <= cap + 1e-9 for s, cap in zip(sparsities, caps, strict=True))
        FixedAllocation(sparsities, tolerance=1e-9).block_sparsities(target, params)  # raises if off target
    assert len(seen) > 500  # the walk explores, it does not stay put
    assert max(max(g) for g in seen) == max(bounds.high)  # and reaches the caps
    for _ in range(200):
        genome = random_genome(len(caps), rng, bounds, moves=16)
        assert sum(genome) == 0 and bounds.contains(genome)


def test_a_mutant_differs_from_its_parent_by_one_to_three_paired_moves():
    bounds = LevelBounds.for_target(0.5, 0.05, [0.9] * 10)
    rng = random.Random(1)
    parent = (0,) * 10
    for _ in range(500):
        child = mutate(parent, rng, bounds, max_moves=3)
        moved = sum(abs(c - p) for c, p in zip(child, parent, strict=True))
        assert child != parent and moved in (2, 4, 6)


def test_search_config_rejects_inconsistent_settings():
    with pytest.raises(SparsityConfigError, match="increasing"):
        SearchConfig(stage_tokens=[512, 256], survivors=[2])
    with pytest.raises(SparsityConfigError, match="one entry per stage"):
        SearchConfig(stage_tokens=[256, 512], survivors=[])
    with pytest.raises(SparsityConfigError, match="shrink"):
        SearchConfig(offspring=4, stage_tokens=[256, 512], survivors=[8])
    with pytest.raises(SparsityConfigError, match="fitness"):
        SearchConfig(fitness="accuracy")
    with pytest.raises(SparsityConfigError, match="reachable"):
        LevelBounds.for_target(0.8, 0.05, [0.9, 0.7])


# ------------------------------------------------------------------------------------------ the search
def _quadratic(best: tuple[int, ...]):
    calls = []

    def score(genomes, stage):
        calls.append((len(genomes), stage))
        # a larger stage measures the same thing more precisely: the first stage adds a genome-dependent bias
        return [sum((g - b) ** 2 for g, b in zip(genome, best, strict=True)) + (0.3 * (hash(genome) % 3) if stage == 0
                                                                                 else 0.0) for genome in genomes]

    return score, calls


def _search(generations=25, mode="evolutionary"):
    config = SearchConfig(generations=generations, offspring=8, stage_tokens=[100, 400], survivors=[3], step=0.05)
    bounds = LevelBounds.for_target(0.5, 0.05, [0.9] * 6)
    return AllocationSearch(config, 6, bounds, stage_sequences=[1, 4], sequence_tokens=100, mode=mode)


def test_racing_search_is_elitist_and_finds_a_budget_preserving_optimum():
    best = (3, -2, 1, 0, -1, -1)
    score, calls = _quadratic(best)
    search = _search()
    while not search.done:
        search.step(score, lambda g: [score([g], s)[0] for s in range(2)])
    fitness = [r.best_fitness for r in search.history]
    assert all(b <= a for a, b in zip(fitness, fitness[1:], strict=False))  # elitist: never worse
    assert fitness[-1] < search.history[0].parent_fitness_before
    assert search.parent == best  # a 6-block quadratic is solved in 25 generations
    assert search.evaluations == 25 * (8 + 3)
    assert search.tokens_scored == 25 * (8 * 1 + 3 * 4) * 100
    assert (8, 0) in calls and (3, 1) in calls  # racing: all offspring on stage 0, the survivors on stage 1


def test_random_baseline_uses_the_same_number_of_evaluations_and_does_worse_on_a_smooth_landscape():
    best = (3, -2, 1, 0, -1, -1)
    score, _ = _quadratic(best)
    evo, rnd = _search(), _search(mode="random")
    for search in (evo, rnd):
        while not search.done:
            search.step(score, lambda g: [score([g], s)[0] for s in range(2)])
    assert evo.evaluations == rnd.evaluations
    assert evo.parent_fitness[-1] < rnd.parent_fitness[-1]


def test_search_state_round_trips_through_json_and_resumes_exactly():
    score, _ = _quadratic((2, -2, 1, 0, -1, 0))
    parent_score = lambda g: [score([g], s)[0] for s in range(2)]  # noqa: E731
    straight = _search(12)
    while not straight.done:
        straight.step(score, parent_score)
    first = _search(12)
    for _ in range(5):
        first.step(score, parent_score)
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint / the search file holds
    resumed = _search(12)
    resumed.load_state_dict(state)
    while not resumed.done:
        resumed.step(score, parent_score)
    assert resumed.parent == straight.parent
    strip = lambda s: [(r.best_fitness, r.improved, r.stage_best) for r in s.history]  # noqa: E731
    assert strip(resumed) == strip(straight)
    other = SearchConfig(generations=12, offspring=9, stage_tokens=[100, 400], survivors=[3], step=0.05)
    with pytest.raises(SparsityConfigError, match="other settings"):
        AllocationSearch(other, 6, resumed.bounds, [1, 4], 100).load_state_dict(state)


def test_split_work_gives_every_rank_every_result_in_order():
    items = [f"genome{i}" for i in range(7)]
    work = lambda mine: [len(x) * 10 + int(x[-1]) for x in mine]  # noqa: E731
    single = split_work(items, 0, 1, work, lambda obj: [obj])
    contributions = {}

    class Gathered(Exception):
        pass

    def capture(rank):
        def gather(obj):
            contributions[rank] = obj
            raise Gathered

        return gather

    for rank in (0, 1):  # what each of two ranks contributes to the all-gather
        with pytest.raises(Gathered):
            split_work(items, rank, 2, work, capture(rank))
    assert [i for i, _ in contributions[0]] == [0, 2, 4, 6] and [i for i, _ in contributions[1]] == [1, 3, 5]
    for rank in (0, 1):
        assert split_work(items, rank, 2, work, lambda _obj: [contributions[0], contributions[1]]) == single


# ------------------------------------------------------------------------------------------ cached fitness
def _sparsified_tiny(seed=0):
    model = tiny_llama(seed, **SIX_BLOCKS).eval()
    sites = projection_sites(model, LLAMA_LAYOUT)
    for site in sites:
        linear = model.get_submodule(site.name)
        parent, _, attr = site.name.rpartition(".")
        setattr(model.get_submodule(parent), attr, SparseLinear.from_linear(linear, torch.zeros(site.in_features)))
    return model, sites


def test_cached_fitness_equals_a_full_forward_of_the_sparse_model():
    model, sites = _sparsified_tiny()
    blocks = decoder_blocks(model, LLAMA_LAYOUT)
    names = {b: [s.name for s in sites if s.block == b] for b in range(len(blocks))}
    sizes = {s.name: s.in_features for s in sites}

    def thresholds(block, level):  # any deterministic thresholds per (block, level) will do
        g = torch.Generator().manual_seed(100 * block + level + 50)
        return {n: torch.rand(sizes[n], generator=g) * (0.4 + 0.05 * level) for n in names[block]}

    ids = torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(0))
    evaluator = FitnessEvaluator(model, blocks, model.model.norm, thresholds, names, ids, batch_size=2)
    parent, child = (0, 0, 0, 0, 0, 0), (0, 0, 0, 1, -1, 0)
    parent_sums = evaluator.set_parent(parent)
    child_sums = evaluator.score(child, 4)

    with torch.no_grad():
        set_sparsity_enabled(model, False)
        dense = F.log_softmax(model(input_ids=ids).logits[:, :-1].float(), -1).to(torch.float16).float()
        set_sparsity_enabled(model, True)

        def full(genome):
            for b, level in enumerate(genome):
                for name, threshold in thresholds(b, level).items():
                    set_threshold(model, name, threshold)
            log_q = F.log_softmax(model(input_ids=ids).logits[:, :-1].float(), -1)
            return (dense.exp() * (dense - log_q)).sum(-1).sum(-1).tolist()

        assert child_sums == pytest.approx(full(child), rel=1e-5, abs=1e-6)
        assert parent_sums == pytest.approx(full(parent), rel=1e-5, abs=1e-6)
    assert min(child_sums) > 0
    # the child changed blocks 3 and 4: blocks 0-2 came from the parent's cache
    assert evaluator.blocks_run == 2 * 6 + 2 * 3  # parent pass (2 batches x 6) + child (2 batches x 3)
    # later stages score only the sequences not scored yet
    assert evaluator.score(child, 4, first_sequence=2) == pytest.approx(child_sums[2:], rel=1e-6)
    assert evaluator.fitness_of_sums(child_sums, 2) == pytest.approx(sum(child_sums[:2]) / (2 * 23))


# ------------------------------------------------------------------------------------------ the Lightning job
SEARCH = {"generations": 3, "offspring": 4, "stage_tokens": [63, 126], "survivors": [2], "step": 0.05,
          "max_sparsity": 0.8, "random_baseline": True}


def _module(output_dir: Path) -> WiSparseCalibration:
    return WiSparseCalibration(
        random_config={"vocab_size": 256, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
                       "num_key_value_heads": 2, "max_position_embeddings": 256, **SIX_BLOCKS},
        output_dir=str(output_dir), target_sparsity=0.5, eval_sparsities=[0.5], alpha_grid=[0.0, 0.5, 1.0],
        alpha_sparsities=[0.5], histogram_bins=256, reference_sequences=1, alpha_tokens=64, greedy_step=0.05,
        greedy_max_sparsity=0.8, eval_batch_size=1, search=SearchConfig(**SEARCH),
    )


def _data() -> WiSparseTextData:
    return WiSparseTextData(tokenizer="bytes", sequence_length=64, calibration_sequences=4, fitness_sequences=2,
                            evaluation_sequences=2, batch_size=2)


def _fit(output_dir: Path, devices: int = 1, **kwargs) -> WiSparseCalibration:
    module = _module(output_dir)
    trainer = L.Trainer(accelerator="cpu", devices=devices, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(output_dir), num_sanity_val_steps=0,
                        callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath=str(output_dir / "ckpt"),
                                                                      save_last=True, save_top_k=1)],
                        **kwargs)
    trainer.fit(module, datamodule=_data())
    return module


def _search_file(output_dir: Path, mode: str) -> dict:
    return json.loads((output_dir / f"search-{mode}-0.50.json").read_text())


def test_the_job_searches_one_generation_per_epoch_checkpoints_it_and_evaluates_the_result(tmp_path):
    module = _fit(tmp_path)
    assert module.trainer.current_epoch == 1 + 2 * 3 and module.trainer.global_step == 6
    evo, rnd = _search_file(tmp_path, "evolutionary"), _search_file(tmp_path, "random")
    assert evo["generations"] == rnd["generations"] == 3 and evo["evaluations"] == rnd["evaluations"] == 3 * 6
    assert evo["best_fitness"] <= evo["initial_fitness"]
    assert sum(evo["genome"]) == 0
    assert sum(evo["block_sparsities"]) / 6 == pytest.approx(0.5)
    assert 0 < evo["cache_saving"] < 1
    for image in ("search-fitness-0.50.png", "search-profile-0.50.png"):
        assert (tmp_path / image).stat().st_size > 1000
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["wisparse_search"]
    assert [s["mode"] for s in state] == ["evolutionary", "random"]
    assert state[0]["parent"] == evo["genome"] and len(state[1]["history"]) == 3
    results = json.loads((tmp_path / "results.json").read_text())
    rows = {r["method"]: r for r in results["results"]}
    assert {"wisparse-full", "random-search", "wisparse-alpha-greedy", "teal"} <= set(rows)
    assert rows["wisparse-full"]["calibrated"] == pytest.approx(0.5, abs=1e-6)
    assert [s["genome"] for s in results["search"]] == [evo["genome"], rnd["genome"]]
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["metadata"]["method"] == "wisparse-full"
    assert plan["metadata"]["block_sparsities"] == pytest.approx(evo["block_sparsities"])


@pytest.mark.slow
def test_two_gloo_processes_find_the_same_genome_as_one(tmp_path):
    _fit(tmp_path / "one")
    _fit(tmp_path / "two", devices=2, strategy="ddp_spawn")
    for mode in ("evolutionary", "random"):
        one, two = _search_file(tmp_path / "one", mode), _search_file(tmp_path / "two", mode)
        assert one["genome"] == two["genome"], mode
        assert one["best_fitness"] == pytest.approx(two["best_fitness"], rel=1e-6)
        assert [r["best_fitness"] for r in one["state"]["history"]] == pytest.approx(
            [r["best_fitness"] for r in two["state"]["history"]], rel=1e-6)


def _env():
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    return {**env, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONWARNINGS": "ignore",
            "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")])}


FAST = ["--trainer.enable_progress_bar=false", "--model.init_args.search.generations=4",
        "--model.init_args.search.offspring=4", "--model.init_args.alpha_grid=[0.0,0.5,1.0]",
        "--model.init_args.histogram_bins=256", "--data.init_args.calibration_sequences=4"]


@pytest.mark.slow
def test_a_search_killed_with_sigkill_resumes_with_ckpt_path_last_to_the_same_result(tmp_path):
    config = str(REPO / "conf" / "wisparse" / "tiny-search.yaml")
    crashed, straight = tmp_path / "crashed", tmp_path / "straight"
    crashed.mkdir(), straight.mkdir()
    marker = tmp_path / "held"
    # one global step per search generation: held after the 6th (4 evolutionary + 2 random), before its checkpoint
    hold = f'{{"class_path": "kill_helpers.HoldAtStep", "init_args": {{"step": 6, "marker": "{marker}"}}}}'
    command = [sys.executable, "-m", "vp_lightning", "fit", "--config", config, *FAST]
    returncode = run_until_marker_then_sigkill([*command, f"--trainer.callbacks+={hold}"], crashed, _env(), marker,
                                               timeout=400)
    assert returncode == -signal.SIGKILL
    last = crashed / "runs" / "wisparse" / "tiny-search" / "version_0" / "checkpoints" / "last.ckpt"
    state = torch.load(last, weights_only=False)["wisparse_search"]
    # killed in the random search's second generation, before its checkpoint: the last one has 4 + 1 generations
    assert [len(s["history"]) for s in state] == [4, 1]

    def run(cwd, *extra):
        done = subprocess.run([*command, *extra], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-4000:]
        return done.stdout + done.stderr

    out = run(crashed, "--ckpt_path", "last")
    assert "search resumed: evolutionary at generation 4/4, random at generation 1/4" in out
    run(straight)
    folder = Path("runs") / "wisparse" / "tiny-search"
    for mode in ("evolutionary", "random"):
        a, b = _search_file(crashed / folder, mode), _search_file(straight / folder, mode)
        assert a["genome"] == b["genome"], mode
        assert [r["best_fitness"] for r in a["state"]["history"]] == [r["best_fitness"] for r in b["state"]["history"]]
        assert a["state"]["rng"] == b["state"]["rng"]
    results = [json.loads((d / folder / "results.json").read_text())["results"] for d in (crashed, straight)]
    assert results[0] == results[1]
