"""WiSparse calibration as a Lightning job.

``trainer.fit(WiSparseCalibration(...), datamodule=WiSparseTextData(...))`` with ``max_epochs=1``:

1. the training epoch runs the dense model over the calibration pool and histograms the weight-aware scores of
   every projection's inputs (batches are sharded across ranks; histograms are summed with one all-reduce);
2. ``select_alpha``: per (block, projection) and sparsity, the alpha with the least relative output error;
3. ``build_greedy_tables``: the in-block greedy table of every block (blocks split across ranks);
4. with ``search`` set, the across-block allocation search: one generation per further epoch (the
   evolutionary search, then optionally a random-search baseline with the same number of fitness evaluations);
   offspring are split across ranks, checkpoints hold the search state and ``--ckpt_path`` resumes it;
5. ``export_plans``: plans for every method and target sparsity, ``plan.json`` for the main one;
6. ``evaluate``: perplexity, KL to dense and realised sparsity on the evaluation pool -> ``results.md/.csv/.json``.

Every stage writes its result to ``output_dir`` with a key describing its inputs; a rerun with the same
settings loads finished stages instead of recomputing them (a changed setting recomputes that stage and the
ones after it).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from tqdm.auto import tqdm

from vp_lightning.sparsity.allocation import (
    AlphaRule,
    BlockAllocation,
    FixedAllocation,
    UniformAllocation,
    block_parameter_counts,
    build_plan,
    fixed_alpha,
)
from vp_lightning.sparsity.alpha import AlphaSelection, block_alpha_errors
from vp_lightning.sparsity.correction import correct_thresholds
from vp_lightning.sparsity.errors import SparsityConfigError
from vp_lightning.sparsity.evaluation import (
    EvalResult,
    Variant,
    convention,
    evaluate_variants,
    results_csv,
    results_json,
    results_markdown,
)
from vp_lightning.sparsity.fitness import FitnessEvaluator
from vp_lightning.sparsity.greedy import GreedyTable, greedy_table
from vp_lightning.sparsity.layers import set_sparsity_enabled, set_threshold, sparsify
from vp_lightning.sparsity.loading import (
    ProjectionLayout,
    ProjectionSite,
    decoder_blocks,
    layout_for,
    load_causal_lm,
    projection_sites,
)
from vp_lightning.sparsity.plan import SparsityPlan, save_plan
from vp_lightning.sparsity.reference import BlockReference, capture_block_io, run_block
from vp_lightning.sparsity.scores import DEFAULT_ALPHA_GRID, LogBins
from vp_lightning.sparsity.search import AllocationSearch, Genome, LevelBounds, SearchConfig, split_work
from vp_lightning.sparsity.search import block_sparsities as genome_sparsities
from vp_lightning.sparsity.statistics import ScoreStatistics

DEFAULT_ALPHA_SPARSITIES = (0.1, 0.25, 0.4, 0.5, 0.6, 0.75, 0.9)


def _digest(key: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


class WiSparseCalibration(L.LightningModule):
    """Training-free WiSparse calibration, allocation and evaluation of a causal LM.

    Args:
        model: model to sparsify: None (embedded SmolLM2-135M), a ``.gguf`` file, a local model directory or
            a cached Hugging Face id (never downloaded).
        gguf_file: GGUF file name inside ``model`` when ``model`` is a directory.
        dtype: weight dtype (``float32``, ``bfloat16``, ``float16``).
        random_config: ``LlamaConfig`` fields of a randomly initialised model instead (tests, smoke runs).
        layout: where the blocks and projections are; None to infer from the model type.
        output_dir: folder for statistics, tables, plans and results (one folder per experiment).
        target_sparsity: model-wide parameter-weighted sparsity of the main plan (``plan.json``).
        eval_sparsities: target sparsities of the results table (the target is always included).
        alpha_grid: alphas whose score histograms are collected.
        alpha_sparsities: sparsities at which alpha is chosen per projection (None: a default grid plus the
            evaluation targets); at other sparsities the nearest grid point's alpha is used.
        histogram_bins: finite log-spaced histogram bins.
        histogram_range: (low, high) score range of the finite bins.
        reference_sequences: calibration sequences whose dense block inputs drive alpha selection and the greedy.
        alpha_tokens: cap on tokens per projection for alpha selection.
        greedy_step: block-sparsity increment of the in-block greedy.
        greedy_max_sparsity: block sparsity where the greedy stops.
        allocation: sparsity of every block for a target; None = uniform.
        threshold_correction_sequences: calibration sequences on which every plan's thresholds are corrected
            for the sparse model's own activations (0 = thresholds straight from the dense statistics).
        threshold_correction_iterations: fixed-point steps of that correction.
        eval_batch_size: sequences per forward pass in the evaluation (and in the search's fitness).
        dense_prefix: leading positions of each evaluation sequence left dense.
        search: settings of the across-block evolutionary search (None: no search, uniform allocation). The job
            then runs ``1 + generations`` epochs (twice the generations with the random baseline) and steps a
            no-op optimizer once per generation, so checkpoints are saved per generation.
    """

    def __init__(
        self,
        model: str | None = None,
        gguf_file: str | None = None,
        dtype: str = "float32",
        random_config: dict[str, Any] | None = None,
        layout: ProjectionLayout | None = None,
        output_dir: str = "runs/wisparse/smollm2",
        target_sparsity: float = 0.5,
        eval_sparsities: list[float] | None = None,
        alpha_grid: list[float] | None = None,
        alpha_sparsities: list[float] | None = None,
        histogram_bins: int = 2048,
        histogram_range: tuple[float, float] = (1e-9, 1e6),
        reference_sequences: int = 2,
        alpha_tokens: int = 512,
        greedy_step: float = 0.025,
        greedy_max_sparsity: float = 0.9,
        allocation: BlockAllocation | None = None,
        threshold_correction_sequences: int = 0,
        threshold_correction_iterations: int = 1,
        eval_batch_size: int = 2,
        dense_prefix: int = 0,
        search: SearchConfig | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 < target_sparsity < 1.0:
            raise SparsityConfigError(f"target_sparsity must lie in (0, 1), got {target_sparsity}")
        self.save_hyperparameters(ignore=["allocation", "layout", "search"])
        self.model_source = model
        self.gguf_file = gguf_file
        self.dtype_name = dtype
        self.random_config = random_config
        self.layout_override = layout
        self.output_dir = Path(output_dir)
        self.target_sparsity = float(target_sparsity)
        self.eval_sparsities = sorted({float(s) for s in (eval_sparsities or [0.25, 0.4, 0.5])} | {self.target_sparsity})
        self.alpha_grid = [float(a) for a in (alpha_grid if alpha_grid is not None else DEFAULT_ALPHA_GRID)]
        for required in (0.0, 1.0):
            if required not in self.alpha_grid:
                # TEAL (alpha 0) and WINA (alpha 1) are the reference rows of every comparison
                self.alpha_grid = sorted({*self.alpha_grid, required})
        base = alpha_sparsities if alpha_sparsities is not None else DEFAULT_ALPHA_SPARSITIES
        self.alpha_sparsities = sorted({float(s) for s in base} | set(self.eval_sparsities))
        self.bins = LogBins(histogram_range[0], histogram_range[1], histogram_bins)
        self.reference_sequences = reference_sequences
        self.alpha_tokens = alpha_tokens
        self.greedy_step = greedy_step
        self.greedy_max_sparsity = greedy_max_sparsity
        self.allocation = allocation or UniformAllocation()
        self.threshold_correction_sequences = threshold_correction_sequences
        self.threshold_correction_iterations = threshold_correction_iterations
        self.eval_batch_size = eval_batch_size
        self.dense_prefix = dense_prefix
        # Nothing is trained: optimisation is manual and never happens. DistributedDataParallel refuses to
        # wrap a module without a trainable parameter, so one unused scalar makes `strategy=ddp` work.
        self.automatic_optimization = False
        self._ddp_placeholder = nn.Parameter(torch.zeros(1))
        self.llm: nn.Module | None = None
        self.model_name = ""
        self.strict_loading = False
        self.stats: ScoreStatistics | None = None
        self.alpha_selection: AlphaSelection | None = None
        self.tables: dict[int, GreedyTable] = {}
        self.results: list[Any] = []
        self._hooks: ExitStack | None = None
        self._stats_loaded = False
        self._reference: BlockReference | None = None
        self._keys: dict[str, str] = {}
        self._timings: dict[str, float] = {}
        self._calibration_start = 0.0
        self.search_config = search
        self.searches: list[AllocationSearch] = []
        self._search_state: list[dict[str, Any]] | None = None
        self._evaluator: FitnessEvaluator | None = None
        self._stage_sequences: list[int] = []

    # ----------------------------------------------------------------------------------------- setup
    def configure_model(self) -> None:
        if self.llm is not None:
            return
        rank_zero_info("[wisparse] loading model ...")
        self.llm, self.model_name = load_causal_lm(
            self.model_source, self.gguf_file, self.dtype_name, self.random_config
        )
        self.layout = layout_for(self.llm, self.layout_override)
        self.sites: list[ProjectionSite] = projection_sites(self.llm, self.layout)
        rank_zero_info(f"[wisparse] {self.model_name}: {len(self.sites)} projections in "
                       f"{len(decoder_blocks(self.llm, self.layout))} blocks")

    def configure_optimizers(self) -> Any:
        if self.search_config is None:
            return None
        # Stepped (with no gradient: a no-op) once per search generation, so the global step counts generations
        # and ModelCheckpoint, which skips saving when the step has not moved, saves after each of them.
        return torch.optim.SGD([self._ddp_placeholder], lr=0.0)

    def setup(self, stage: str) -> None:
        if self.search_config is not None and stage == "fit":
            epochs = 1 + self.search_config.generations * (2 if self.search_config.random_baseline else 1)
            if self.trainer.fit_loop.max_epochs != epochs:
                rank_zero_info(f"[wisparse] max_epochs set to {epochs}: 1 calibration epoch + one per search generation")
                self.trainer.fit_loop.max_epochs = epochs

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # the model's weights are an input, not a result: checkpoints keep only the job's own state
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("llm.")}
        if self.searches:
            checkpoint["wisparse_search"] = [search.state_dict() for search in self.searches]
        elif self._search_state is not None:
            checkpoint["wisparse_search"] = self._search_state

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._search_state = checkpoint.get("wisparse_search")

    # ------------------------------------------------------------------------------ distributed helpers
    @property
    def world(self) -> tuple[int, int]:
        """(rank, world size)."""
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def _reduce_sum(self, tensor: Tensor) -> Tensor:
        if self.world[1] > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def _gather(self, obj: Any) -> list[Any]:
        if self.world[1] == 1:
            return [obj]
        gathered: list[Any] = [None] * self.world[1]
        dist.all_gather_object(gathered, obj)
        return gathered

    def _is_main(self) -> bool:
        return self.world[0] == 0

    @contextmanager
    def _stage(self, name: str) -> Iterator[None]:
        rank_zero_info(f"[wisparse] stage {name} ...")
        start = time.perf_counter()
        yield
        self._timings[name] = time.perf_counter() - start
        rank_zero_info(f"[wisparse] stage {name} done in {self._timings[name]:.1f}s")

    def _log_metrics(self, metrics: dict[str, float]) -> None:
        for logger in self.loggers:
            logger.log_metrics(metrics, step=self.global_step)

    # ------------------------------------------------------------------------------------ stage keys
    def _datamodule(self) -> Any:
        datamodule = self.trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "pool"):
            raise SparsityConfigError(
                "WiSparseCalibration needs a datamodule with pool(name) (e.g. vp_lightning.sparsity.WiSparseTextData)"
            )
        return datamodule

    def _key(self, stage: str) -> dict[str, Any]:
        data = self._datamodule()
        if stage == "statistics":
            return {
                "model": self.model_name,
                "dtype": self.dtype_name,
                "sites": [site.name for site in self.sites],
                "alphas": self.alpha_grid,
                "bins": [self.bins.low, self.bins.high, self.bins.num_bins],
                "calibration": data.pool_fingerprint("calibration"),
            }
        if stage == "alpha":
            return {
                "statistics": _digest(self._key("statistics")),
                "reference": self.reference_sequences,
                "alpha_tokens": self.alpha_tokens,
                "sparsities": self.alpha_sparsities,
            }
        if stage == "greedy":
            return {
                "alpha": _digest(self._key("alpha")),
                "step": self.greedy_step,
                "max_sparsity": self.greedy_max_sparsity,
                "error": "per-token squared error / squared dense output norm",
            }
        if stage == "evaluation":
            return {
                "greedy": _digest(self._key("greedy")),
                "evaluation": data.pool_fingerprint("evaluation"),
                "targets": self.eval_sparsities,
                "target": self.target_sparsity,
                "allocation": self.allocation.describe(),
                "threshold_correction": [self.threshold_correction_sequences, self.threshold_correction_iterations],
                "dense_prefix": self.dense_prefix,
                "search": {s.mode: list(s.parent) for s in self.searches},
            }
        raise KeyError(stage)

    def _load_json(self, path: Path, stage: str, quiet: bool = False) -> dict[str, Any] | None:
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        if data.get("key") != self._key(stage):
            if not quiet:
                rank_zero_info(f"[wisparse] {path} was made with other settings; recomputing stage {stage}")
            return None
        return data

    # ---------------------------------------------------------------- stage 1: calibration statistics
    @property
    def statistics_path(self) -> Path:
        return self.output_dir / "statistics"

    def on_train_start(self) -> None:
        assert self.llm is not None
        data = self._datamodule()
        vocab = self.llm.get_input_embeddings().num_embeddings
        for pool in ("calibration", "evaluation"):
            if int(data.pool(pool).max()) >= vocab:
                raise SparsityConfigError(f"the {pool} pool has token ids >= the model's vocabulary ({vocab}); "
                                 "the datamodule's tokenizer does not match the model")
        key = self._key("statistics")
        meta_path = self.statistics_path.with_suffix(".json")
        if meta_path.is_file():
            stats, saved_key = ScoreStatistics.load(self.statistics_path)
            if saved_key == key:
                self.stats = stats
                self._stats_loaded = True
                rank_zero_info(f"[wisparse] statistics loaded from {meta_path} ({stats.tokens()} tokens); "
                               "skipping the calibration pass")
                return
            rank_zero_info(f"[wisparse] {meta_path} was made with other settings; recollecting statistics")
        self.stats = ScoreStatistics.for_model(self.llm, self.sites, self.alpha_grid, self.bins)
        self._hooks = ExitStack()
        self._hooks.enter_context(self.stats.hooks(self.llm))
        self._calibration_start = time.perf_counter()
        rank_zero_info(f"[wisparse] stage statistics: {data.pool('calibration').shape[0]} calibration sequences "
                       f"x {data.pool('calibration').shape[1]} tokens")

    def on_train_epoch_start(self) -> None:
        assert self.llm is not None
        self.llm.eval()  # Lightning puts the whole module in train mode; the LM only ever runs inference

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> int | None:
        if self.current_epoch >= 1:  # a search generation: one call of training_step, whatever the batch
            return -1 if batch_idx >= 1 else None
        return -1 if self._stats_loaded else None

    def training_step(self, batch: Tensor, batch_idx: int) -> None:
        if self.current_epoch >= 1:
            self.search_generation()
            optimizer = self.optimizers()
            optimizer.step()  # no gradient, no change: advances the global step (one per generation)
            return None
        # batch: (b, n) calibration token ids; the hooks histogram every projection input
        assert self.llm is not None
        with torch.no_grad():
            self.llm(input_ids=batch, use_cache=False)
        elapsed = max(time.perf_counter() - self._calibration_start, 1e-9)
        tokens = (batch_idx + 1) * batch.numel()
        self.log("calibration/tokens_per_s", tokens / elapsed, prog_bar=True, on_step=True, batch_size=batch.shape[0])
        return None

    def on_train_epoch_end(self) -> None:
        if self.current_epoch != 0 or self._stats_loaded or self.stats is None:
            return
        if self._hooks is not None:
            self._hooks.close()
            self._hooks = None
        self.stats.all_reduce_(self._reduce_sum)
        self._timings["statistics"] = time.perf_counter() - self._calibration_start
        if self._is_main():
            self.stats.save(self.statistics_path, key=self._key("statistics"))
        rank_zero_info(f"[wisparse] statistics of {self.stats.tokens()} tokens saved to {self.output_dir} "
                       f"({self._timings['statistics']:.1f}s)")

    def on_train_end(self) -> None:
        self.run_stages()

    def run_stages(self) -> None:
        """Alpha selection, greedy tables, plans and evaluation (each skipped when already saved)."""
        with torch.no_grad():
            self.select_alpha()
            self.build_greedy_tables()
            self.prepare_search()
            unfinished = [s.mode for s in self.searches if not s.done]
            if unfinished:
                rank_zero_warn(f"the {', '.join(unfinished)} search stopped early; its best genome so far is evaluated")
            if self._load_results() is None:
                self.evaluate(self.export_plans())

    # --------------------------------------------------------------------------- shared helpers
    def _blocks(self) -> nn.ModuleList:
        assert self.llm is not None
        return decoder_blocks(self.llm, self.layout)

    def _my_blocks(self) -> list[int]:
        rank, world = self.world
        return [b for b in range(len(self._blocks())) if b % world == rank]

    def _install_sparse_layers(self) -> None:
        """Swap the projections for (disabled) sparse layers once; thresholds are set per use."""
        assert self.llm is not None and self.stats is not None
        zero = build_plan(self.stats, self.sites, [0.0] * len(self._blocks()), fixed_alpha(0.0), None,
                          self.model_name, 0.0)
        sparsify(self.llm, zero)
        set_sparsity_enabled(self.llm, False)

    def reference(self) -> BlockReference:
        """Dense block inputs of the first ``reference_sequences`` calibration sequences (cached)."""
        if self._reference is None:
            assert self.llm is not None
            ids = self._datamodule().pool("calibration")[: self.reference_sequences].to(self.device)
            set_sparsity_enabled(self.llm, False)
            self._reference = capture_block_io(self.llm, self._blocks(), ids)
        return self._reference

    def _sites_of(self, block: int) -> list[ProjectionSite]:
        return [site for site in self.sites if site.block == block]

    # -------------------------------------------------------------------------- stage 2: alpha
    def select_alpha(self) -> AlphaSelection:
        """Relative output error of every (alpha, sparsity) per projection; saved to ``alpha.json``."""
        path = self.output_dir / "alpha.json"
        saved = self._load_json(path, "alpha")
        if saved is not None:
            self.alpha_selection = AlphaSelection.from_json(saved["selection"])
            rank_zero_info(f"[wisparse] alpha selection loaded from {path}")
            return self.alpha_selection
        assert self.stats is not None
        with self._stage("alpha"):
            self._install_sparse_layers()
            reference = self.reference()
            errors: dict[str, list[list[float]]] = {}
            for b in tqdm(self._my_blocks(), desc="alpha", disable=not self._is_main()):
                block_errors = block_alpha_errors(
                    self._blocks()[b],
                    b,
                    {site.projection: site.name for site in self._sites_of(b)},
                    self.stats,
                    reference,
                    self.alpha_sparsities,
                    self.alpha_tokens,
                )
                errors.update({name: err.tolist() for name, err in block_errors.items()})
            merged = {name: err for part in self._gather(errors) for name, err in part.items()}
            ordered = {site.name: torch.tensor(merged[site.name]) for site in self.sites}
            self.alpha_selection = AlphaSelection(self.alpha_grid, self.alpha_sparsities, ordered)
            if self._is_main():
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps({"key": self._key("alpha"),
                                            "selection": self.alpha_selection.to_json()}) + "\n")
        return self.alpha_selection

    def alpha_rule(self) -> AlphaRule:
        """WiSparse alpha: the per-projection choice at the nearest calibrated sparsity."""
        assert self.alpha_selection is not None
        return self.alpha_selection.best_alpha

    # ------------------------------------------------------------------------- stage 3: greedy
    def _greedy_path(self, block: int) -> Path:
        return self.output_dir / "greedy" / f"block_{block:03d}.json"

    def build_greedy_tables(self) -> dict[int, GreedyTable]:
        """In-block greedy table of every block; one file per block, so a killed run resumes per block."""
        assert self.stats is not None and self.llm is not None
        self._install_sparse_layers()
        rule = self.alpha_rule()
        mine: dict[int, dict[str, Any]] = {}
        todo = []
        for b in self._my_blocks():
            saved = self._load_json(self._greedy_path(b), "greedy", quiet=True)
            if saved is not None:
                mine[b] = saved["table"]
            else:
                todo.append(b)
        if len(todo) < len(self._my_blocks()):
            rank_zero_info(f"[wisparse] greedy tables of {len(self._my_blocks()) - len(todo)} blocks loaded from "
                           f"{self.output_dir / 'greedy'}")
        if todo or self.world[1] > 1:
            with self._stage("greedy"):
                levels = int(self.greedy_max_sparsity / self.greedy_step + 1e-9)
                progress = tqdm(total=levels * len(todo), desc="greedy", disable=not self._is_main())
                for b in todo:
                    start = time.perf_counter()
                    table = self._greedy_block(b, rule, lambda _level: progress.update(1))
                    mine[b] = table.to_json()
                    path = self._greedy_path(b)
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text(json.dumps({"key": self._key("greedy"), "table": mine[b]}) + "\n")
                    rank_zero_info(f"[wisparse] greedy block {b}: up to {table.max_sparsity:.3f} "
                                   f"in {time.perf_counter() - start:.1f}s")
                progress.close()
        merged = {b: table for part in self._gather(mine) for b, table in part.items()}
        self.tables = {b: GreedyTable.from_json(merged[b]) for b in sorted(merged)}
        set_sparsity_enabled(self.llm, False)
        return self.tables

    def _greedy_block(self, b: int, rule: AlphaRule, on_step: Any) -> GreedyTable:
        assert self.stats is not None and self.llm is not None
        sites = self._sites_of(b)
        names = [site.name for site in sites]
        block = self._blocks()[b]
        reference = self.reference()
        h_in, h_out = reference.block_input(b), reference.block_output(b)
        # The next block sees the residual stream through an RMSNorm, so an error matters relative to its token's
        # residual norm. Summing raw squared errors instead would let the few tokens with massive activations
        # (100x the median norm in SmolLM2) decide the whole table.
        token_energy = h_out.float().square().sum(-1).clamp_min(1e-30)  # (r, n)
        set_sparsity_enabled(self.llm, False)
        set_sparsity_enabled(self.llm, True, set(names))
        cache: dict[tuple[str, float], Tensor] = {}

        def evaluate(sparsities: Any) -> float:
            for name, s in zip(names, sparsities, strict=True):
                key = (name, round(float(s), 9))
                if key not in cache:
                    cache[key] = self.stats.threshold(name, rule(name, s), s)[1]
                set_threshold(self.llm, name, cache[key])
            out = run_block(block, h_in, reference.block_kwargs)
            return float(((out.float() - h_out.float()).square().sum(-1) / token_energy).mean())

        table = greedy_table(
            evaluate,
            names,
            [site.params for site in sites],
            step=self.greedy_step,
            max_sparsity=self.greedy_max_sparsity,
            on_step=on_step,
        )
        set_sparsity_enabled(self.llm, False, set(names))
        return table

    # ------------------------------------------------------------------------- stage 4: search
    SEARCH_METHODS = {"evolutionary": "wisparse-full", "random": "random-search"}

    def _search_path(self, mode: str) -> Path:
        return self.output_dir / f"search-{mode}-{self.target_sparsity:.2f}.json"

    def prepare_search(self) -> list[AllocationSearch]:
        """Alpha and greedy tables (loaded when saved), level bounds, racing stages; restores a checkpoint's state."""
        config = self.search_config
        if config is None or self.searches:
            return self.searches
        with torch.no_grad():
            self.select_alpha()
            self.build_greedy_tables()
        counts = block_parameter_counts(self.sites)
        if len(set(counts)) != 1:
            raise SparsityConfigError(
                "the allocation search keeps the average sparsity with sum(levels) = 0, which needs blocks of equal "
                f"size; this model's blocks have {sorted(set(counts))} projection weights"
            )
        caps = [min(config.max_sparsity, self.tables[b].max_sparsity) for b in range(len(counts))]
        bounds = LevelBounds.for_target(self.target_sparsity, config.step, caps)
        pool = self._datamodule().pool("fitness")
        predictions = pool.shape[1] - 1
        stages = []
        for tokens in config.stage_tokens:
            sequences = -(-tokens // predictions)
            sequences = -(-sequences // self.eval_batch_size) * self.eval_batch_size
            stages.append(min(sequences, pool.shape[0]))
        if len(set(stages)) != len(stages):
            raise SparsityConfigError(
                f"the fitness pool ({pool.shape[0]} sequences of {predictions} predictions) is too small for the "
                f"racing stages' token budgets {config.stage_tokens}; raise data.fitness_sequences or lower "
                "search.stage_tokens"
            )
        self._stage_sequences = stages
        modes = ["evolutionary"] + (["random"] if config.random_baseline else [])
        self.searches = [AllocationSearch(config, len(counts), bounds, stages, predictions, mode) for mode in modes]
        if self._search_state is not None:
            if len(self._search_state) != len(self.searches):
                raise SparsityConfigError("the checkpoint's search was run with other settings (random_baseline); "
                                          "start a new run instead of resuming it")
            for search, state in zip(self.searches, self._search_state, strict=True):
                search.load_state_dict(state)
            rank_zero_info("[wisparse] search resumed: " + ", ".join(
                f"{s.mode} at generation {s.generation}/{config.generations}" for s in self.searches))
        rank_zero_info(f"[wisparse] search: {len(counts)} blocks, levels of {config.step} in "
                       f"[{min(bounds.low)}, {max(bounds.high)}], racing on {stages} fitness sequences "
                       f"({[s * predictions for s in stages]} tokens), {config.offspring} offspring, survivors "
                       f"{config.survivors}")
        return self.searches

    def _thresholds_of(self, block: int, level: int) -> dict[str, Tensor]:
        """Threshold vectors of block ``block``'s projections at a search level (as ``build_plan`` makes them)."""
        assert self.stats is not None and self.search_config is not None
        rule = self.alpha_rule()
        sparsity = genome_sparsities((level,), self.target_sparsity, self.search_config.step)[0]
        split = self.tables[block].at(sparsity)
        return {
            site.name: self.stats.threshold(site.name, rule(site.name, split[site.name]), split[site.name])[1]
            for site in self._sites_of(block)
        }

    def _fitness_evaluator(self) -> FitnessEvaluator:
        if self._evaluator is None:
            assert self.llm is not None and self.search_config is not None
            self._install_sparse_layers()
            pool = self._datamodule().pool("fitness")[: max(self._stage_sequences)]
            blocks = self._blocks()
            try:
                final_norm = self.llm.get_submodule(self.layout.final_norm)
            except AttributeError as error:
                raise SparsityConfigError(f"model has no module {self.layout.final_norm!r} (layout.final_norm)") from error
            names = {b: [site.name for site in self._sites_of(b)] for b in range(len(blocks))}
            start = time.perf_counter()
            self._evaluator = FitnessEvaluator(self.llm, blocks, final_norm, self._thresholds_of, names,
                                               pool.to(self.device), self.eval_batch_size, self.search_config.fitness)
            rank_zero_info(f"[wisparse] fitness pool cached: dense log-probabilities of {pool.shape[0]} sequences "
                           f"({time.perf_counter() - start:.1f}s)")
        return self._evaluator

    def search_generation(self) -> None:
        """One generation of the current search (epoch 1.. of the job)."""
        assert self.search_config is not None
        searches = self.prepare_search()
        config = self.search_config
        search = searches[min((self.current_epoch - 1) // config.generations, len(searches) - 1)]
        if search.done:
            rank_zero_warn(f"the {search.mode} search already ran {config.generations} generations; nothing to do")
            return
        evaluator = self._fitness_evaluator()
        rank, world = self.world
        start = time.perf_counter()
        with torch.no_grad():
            if evaluator.parent != search.parent:
                evaluator.set_parent(search.parent)
            parent_sums = evaluator.parent_sums
            known: dict[Genome, list[float]] = {}

            def score(genomes: Any, stage: int) -> list[float]:
                count = self._stage_sequences[stage]

                def work(mine: list[Genome]) -> list[list[float]]:
                    out = []
                    for genome in mine:
                        sums = known.get(genome, [])
                        if len(sums) < count:
                            sums = sums + evaluator.score(genome, count, first_sequence=len(sums))
                        out.append(sums)
                    return out

                results = split_work(list(genomes), rank, world, work, self._gather)
                known.update(zip(genomes, results, strict=True))
                return [evaluator.fitness_of_sums(sums, count) for sums in results]

            record = search.step(
                score, lambda _genome: [evaluator.fitness_of_sums(parent_sums, n) for n in self._stage_sequences]
            )
        record.seconds = time.perf_counter() - start
        self._timings[f"search-{search.mode}"] = sum(r.seconds for r in search.history)
        name = "KL" if config.fitness == "kl" else "NLL"
        rank_zero_info(
            f"[wisparse] {search.mode} search generation {search.generation}/{config.generations}: best {name} "
            f"{record.best_fitness:.6g}{' (improved)' if record.improved else ''}; {record.evaluations} evaluations "
            f"in {record.seconds:.1f}s ({record.evaluations / record.seconds:.2f}/s); caches skipped "
            f"{evaluator.saving:.0%} of block forwards"
        )
        prefix = f"search/{search.mode}"
        self._log_metrics({
            f"{prefix}/best_fitness": record.best_fitness,
            f"{prefix}/stage0_best": record.stage_best[0],
            f"{prefix}/evaluations_per_s": record.evaluations / record.seconds,
            f"{prefix}/tokens_per_s": record.tokens_scored / record.seconds,
            f"{prefix}/cache_saving": evaluator.saving,
            f"{prefix}/generation": float(search.generation),
        })
        if self._is_main():
            self._write_search(search, evaluator)

    def _search_summary(self, search: AllocationSearch) -> dict[str, Any]:
        assert self.search_config is not None
        sparsities = genome_sparsities(search.parent, self.target_sparsity, self.search_config.step)
        return {
            "mode": search.mode,
            "method": self.SEARCH_METHODS[search.mode],
            "target": self.target_sparsity,
            "generations": search.generation,
            "evaluations": search.evaluations,
            "tokens_scored": search.tokens_scored,
            "fitness": self.search_config.fitness,
            "best_fitness": search.parent_fitness[-1] if search.parent_fitness else None,
            "initial_fitness": search.history[0].parent_fitness_before if search.history else None,
            "genome": list(search.parent),
            "block_sparsities": sparsities,
            "seconds": sum(r.seconds for r in search.history),
            "stage_sequences": self._stage_sequences,
        }

    def _write_search(self, search: AllocationSearch, evaluator: FitnessEvaluator) -> None:
        """``search-<mode>-<target>.json`` (state and history); the plots once the search is done."""
        path = self._search_path(search.mode)
        path.parent.mkdir(parents=True, exist_ok=True)
        document = {**self._search_summary(search), "cache_saving": evaluator.saving, "state": search.state_dict()}
        path.write_text(json.dumps(document, indent=1) + "\n")
        if search.done:
            from vp_lightning.sparsity.search_plots import plot_search

            images = plot_search(self.searches, self.target_sparsity, self.search_config.step,
                                 self.output_dir, self.search_config.fitness)
            for logger in self.loggers:
                if hasattr(logger, "log_image"):
                    for key, image in images.items():
                        logger.log_image(key=f"search/{key}", images=[str(image)])

    # -------------------------------------------------------------------------- stage 5: plans
    def make_plan(self, method: str, target: float) -> SparsityPlan | None:
        """Plan of one method at one target sparsity (None when the greedy tables do not reach it).

        Methods: ``teal`` (alpha 0, uniform), ``alpha1`` (alpha 1, uniform), ``wisparse-alpha`` (chosen alpha,
        uniform), ``wisparse-alpha-greedy`` (chosen alpha, in-block greedy); after a search, at the target
        sparsity, ``wisparse-full`` (chosen alpha, in-block greedy, evolutionary block allocation) and
        ``random-search`` (the same with the random-search allocation).
        """
        assert self.stats is not None
        allocation = self.allocation
        searched = {self.SEARCH_METHODS[s.mode]: s for s in self.searches}
        if method in searched:
            assert self.search_config is not None
            allocation = FixedAllocation(genome_sparsities(searched[method].parent, target, self.search_config.step))
        block_sparsities = allocation.block_sparsities(target, block_parameter_counts(self.sites))
        rules: dict[str, tuple[AlphaRule, bool, str]] = {
            "teal": (fixed_alpha(0.0), False, "alpha=0 (magnitude only), every projection at the block sparsity"),
            "alpha1": (fixed_alpha(1.0), False, "alpha=1 (|x|*||W_j||), every projection at the block sparsity"),
            "wisparse-alpha": (self.alpha_rule(), False, "alpha per projection, every projection at the block sparsity"),
            "wisparse-alpha-greedy": (self.alpha_rule(), True, "alpha per projection, in-block greedy split"),
            "wisparse-full": (self.alpha_rule(), True, "alpha per projection, in-block greedy, evolutionary block "
                              "allocation"),
            "random-search": (self.alpha_rule(), True, "alpha per projection, in-block greedy, random-search block "
                              "allocation (same fitness evaluations)"),
        }
        rule, greedy, description = rules[method]
        if greedy and any(block_sparsities[b] > self.tables[b].max_sparsity + 1e-9 for b in self.tables):
            rank_zero_warn(f"greedy tables do not reach sparsity {target}; skipping {method} at {target}")
            return None
        plan = build_plan(
            self.stats,
            self.sites,
            block_sparsities,
            rule,
            self.tables if greedy else None,
            self.model_name,
            target,
            metadata={
                "method": method,
                "description": description,
                "allocation": allocation.name if method not in searched else searched[method].mode,
                "block_sparsities": block_sparsities,
                "calibration_tokens": self.stats.tokens(),
            },
        )
        if self.threshold_correction_sequences > 0:
            assert self.llm is not None
            rank, world = self.world
            plan = correct_thresholds(
                self.llm, plan, self.stats, self._correction_sequences()[rank::world],
                self.threshold_correction_iterations, self.eval_batch_size, self._reduce_sum,
            )
        return plan

    def _correction_sequences(self) -> Tensor:
        """Evenly spaced calibration sequences for the threshold correction."""
        pool = self._datamodule().pool("calibration")
        count = min(self.threshold_correction_sequences, pool.shape[0])
        return pool[torch.linspace(0, pool.shape[0] - 1, count).round().long()]

    METHODS = ("teal", "alpha1", "wisparse-alpha", "wisparse-alpha-greedy")

    def export_plans(self) -> dict[tuple[str, float], SparsityPlan]:
        """Plans for every method and evaluation target; ``plan.json`` is WiSparse alpha + greedy at the target."""
        with self._stage("plans"):
            plans = {}
            for target in self.eval_sparsities:
                methods = list(self.METHODS)
                if target == self.target_sparsity:
                    methods += [self.SEARCH_METHODS[s.mode] for s in self.searches]
                for method in methods:
                    plan = self.make_plan(method, target)
                    if plan is not None:
                        plans[(method, target)] = plan
            if self._is_main():
                for (method, target), plan in plans.items():
                    save_plan(plan, self.output_dir / "plans" / f"{method}-{target:.2f}.json")
                main = (plans.get(("wisparse-full", self.target_sparsity))
                        or plans.get(("wisparse-alpha-greedy", self.target_sparsity))
                        or plans[("wisparse-alpha", self.target_sparsity)])
                save_plan(main, self.output_dir / "plan.json")
                rank_zero_info(f"[wisparse] plans written to {self.output_dir / 'plans'}; main plan "
                               f"{self.output_dir / 'plan.json'} ({main.metadata['method']} at {self.target_sparsity})")
        return plans

    # ----------------------------------------------------------------------- stage 5: evaluation
    def _load_results(self) -> list[EvalResult] | None:
        """Saved results of this exact configuration, if any (then plans and evaluation are skipped)."""
        path = self.output_dir / "results.json"
        saved = self._load_json(path, "evaluation")
        if saved is None:
            return None
        rank_zero_info(f"[wisparse] results already in {path}:\n" + (self.output_dir / "results.md").read_text())
        self.results = [EvalResult(**row) for row in saved["results"]]
        return self.results

    def evaluate(self, plans: dict[tuple[str, float], SparsityPlan]) -> list[Any]:
        """Evaluate dense and every plan on the evaluation pool; writes ``results.{md,csv,json}``."""
        assert self.llm is not None
        path = self.output_dir / "results.json"
        sequences = self._datamodule().pool("evaluation")
        rank, world = self.world
        variants = [Variant("dense", "dense model", None)]
        for (method, _target), plan in plans.items():
            variants.append(Variant(method, plan.metadata["description"], plan))
        with self._stage("evaluation"):
            mine = sequences[rank::world]
            progress = tqdm(total=mine.shape[0], desc="evaluation", disable=not self._is_main())
            done = [0]

            def on_batch(count: int) -> None:
                progress.update(count - done[0])
                done[0] = count

            results = evaluate_variants(
                self.llm, mine, variants, self.eval_batch_size, self.dense_prefix, self._reduce_sum, on_batch
            )
            progress.close()
        self.results = results
        header = self._results_header(sequences)
        if self._is_main():
            markdown = results_markdown(results, header)
            (self.output_dir / "results.md").write_text(markdown)
            (self.output_dir / "results.csv").write_text(results_csv(results))
            document = json.loads(results_json(results, header))
            document["key"] = self._key("evaluation")
            document["timings_s"] = self._timings
            document["search"] = [self._search_summary(s) for s in self.searches]
            document["alpha_at_target"] = {s.name: self.alpha_rule()(s.name, self.target_sparsity) for s in self.sites}
            main = plans.get(("wisparse-alpha-greedy", self.target_sparsity))
            if main is not None:
                document["greedy_projection_sparsity_at_target"] = {n: p.sparsity for n, p in main.layers.items()}
            path.write_text(json.dumps(document, indent=1) + "\n")
            rank_zero_info("[wisparse] results\n" + markdown)
            metrics = {}
            for row in results:
                prefix = f"wisparse/{row.method}" + ("" if row.method == "dense" else f"@{row.target:.2f}")
                metrics.update({f"{prefix}/perplexity": row.perplexity, f"{prefix}/kl": row.kl,
                                f"{prefix}/realised_sparsity": row.realised})
            self._log_metrics(metrics)
            self._log_tables(results)
        return results

    def _log_tables(self, results: list[EvalResult]) -> None:
        """Results and the chosen alphas as tables for loggers that take tables (W&B)."""
        columns = ["method", "target", "calibrated", "realised", "perplexity", "kl"]
        rows = [[getattr(r, c) for c in columns] for r in results]
        rule = self.alpha_rule()
        alpha_rows = [[s.block, s.projection, rule(s.name, self.target_sparsity)] for s in self.sites]
        for logger in self.loggers:
            if hasattr(logger, "log_table"):
                logger.log_table(key="wisparse/results", columns=columns, data=rows)
                logger.log_table(key="wisparse/alpha", columns=["block", "projection", "alpha"], data=alpha_rows)

    def _allocation_label(self) -> str:
        if not self.searches or self.search_config is None:
            return self.allocation.name
        parts = []
        for s in self.searches:
            parts.append(f"{s.mode} search at {self.target_sparsity} ({s.generation} generations, {s.evaluations} "
                         f"fitness evaluations, {self.search_config.fitness} on {self._stage_sequences} fitness "
                         f"sequences, {sum(r.seconds for r in s.history):.0f}s)")
        return f"{self.allocation.name} for the fixed methods; " + "; ".join(parts)

    def _results_header(self, sequences: Tensor) -> str:
        assert self.stats is not None and self.alpha_selection is not None
        lines = [
            f"# WiSparse results: {self.model_name} ({self.dtype_name})",
            "",
            convention(sequences.shape[0], sequences.shape[1], self.dense_prefix),
            f"Calibration: {self.stats.tokens()} tokens; alpha grid {self.alpha_grid}; block allocation "
            f"{self._allocation_label()}; greedy step {self.greedy_step} up to {self.greedy_max_sparsity}; thresholds "
            + (f"corrected on {self.threshold_correction_sequences} calibration sequences of the sparse model "
               f"({self.threshold_correction_iterations} step)." if self.threshold_correction_sequences > 0
               else "straight from the dense calibration statistics."),
        ]
        target = self.target_sparsity
        mean = {}
        for label, rule in (("alpha=0", fixed_alpha(0.0)), ("alpha=1", fixed_alpha(1.0)), ("chosen", self.alpha_rule())):
            errs = [self.alpha_selection.error(s.name, rule(s.name, target), target) for s in self.sites]
            mean[label] = sum(errs) / len(errs)
        lines.append(
            f"Mean relative projection output error at sparsity {target} on reference tokens: "
            + ", ".join(f"{k} {v:.4f}" for k, v in mean.items())
            + "."
        )
        return "\n".join(lines)
