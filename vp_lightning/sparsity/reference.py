"""Dense hidden states entering every decoder block, and replaying one block on them.

The alpha selection and the in-block greedy evaluate one block at a time against its dense output; they need
the dense block inputs for a few reference sequences and the extra arguments the model passes to every block
(rotary position embeddings, attention mask), which are captured once and replayed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

# Block arguments tied to incremental decoding; replays run full sequences without a cache.
_CACHE_KWARGS = {"past_key_value", "past_key_values", "cache", "use_cache", "cache_position"}


@dataclass
class BlockReference:
    """Dense block inputs for a batch of reference sequences.

    Attributes:
        hidden: ``hidden[b]`` is the (r, n, d) hidden state entering block b; ``hidden[num_blocks]`` is the
            output of the last block (before the final norm).
        block_kwargs: keyword arguments the model passed to the blocks (identical for every block).
    """

    hidden: list[Tensor]
    block_kwargs: dict[str, Any]

    @property
    def num_blocks(self) -> int:
        return len(self.hidden) - 1

    def block_input(self, b: int) -> Tensor:
        return self.hidden[b]

    def block_output(self, b: int) -> Tensor:
        return self.hidden[b + 1]


def _hidden_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    return args[0] if args else kwargs["hidden_states"]


@torch.no_grad()
def capture_block_io(model: nn.Module, blocks: nn.ModuleList, input_ids: Tensor) -> BlockReference:
    """Run the dense model on ``input_ids`` (r, n) and keep the hidden state entering every block.

    Args:
        model: the causal LM (any sparse layers should be disabled by the caller).
        blocks: its decoder blocks.
        input_ids: (r, n) token ids of the reference sequences.

    Returns:
        The captured :class:`BlockReference`.
    """
    hidden: list[Tensor | None] = [None] * (len(blocks) + 1)
    captured_kwargs: dict[str, Any] = {}
    handles = []
    for b, block in enumerate(blocks):

        def pre_hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], b: int = b) -> None:
            hidden[b] = _hidden_of(args, kwargs).detach()
            if b == 0:
                captured_kwargs.update(
                    {k: v for k, v in kwargs.items() if k not in _CACHE_KWARGS and k != "hidden_states"}
                )

        handles.append(block.register_forward_pre_hook(pre_hook, with_kwargs=True))

    def post_hook(_m: nn.Module, _args: tuple[Any, ...], output: Any) -> None:
        hidden[-1] = (output[0] if isinstance(output, tuple) else output).detach()

    handles.append(blocks[-1].register_forward_hook(post_hook))
    try:
        model(input_ids=input_ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    if any(h is None for h in hidden):
        raise RuntimeError("the model did not run every decoder block; is the projection layout right?")
    return BlockReference(hidden=[h for h in hidden if h is not None], block_kwargs=captured_kwargs)


@torch.no_grad()
def run_block(block: nn.Module, hidden: Tensor, block_kwargs: dict[str, Any]) -> Tensor:
    """Apply one decoder block to ``hidden`` (r, n, d) with the captured keyword arguments."""
    output = block(hidden, **block_kwargs)
    return output[0] if isinstance(output, tuple) else output


@contextmanager
def capture_inputs(modules: dict[str, nn.Module]) -> Iterator[dict[str, Tensor]]:
    """Collect the input of every named module during the context (last call wins)."""
    captured: dict[str, Tensor] = {}
    handles = []
    for name, module in modules.items():

        def hook(_m: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
            captured[name] = args[0].detach()

        handles.append(module.register_forward_pre_hook(hook))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()
