"""LightningModules of the tokenizer track."""

from vp_lightning.models.tokenizer import NonFiniteLossError, TokenizerModule

__all__ = ["NonFiniteLossError", "TokenizerModule"]
