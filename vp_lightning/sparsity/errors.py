"""Errors a user of the WiSparse job can cause (the CLI prints them as one line)."""

from vp_lightning.errors import UserError


class SparsityConfigError(UserError, ValueError):
    """A setting that cannot work (sparsity out of range, unknown dtype, model/tokenizer mismatch, ...)."""


class SparsityInputMissingError(UserError, FileNotFoundError):
    """A model, text source, plan or optional package that is not available locally."""
