"""LightningModules of the tokenizer track."""

from vp_lightning.models.tokenizer import TokenizerModule

__all__ = ["TokenizerModule"]
