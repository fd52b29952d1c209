import os

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
os.environ.setdefault("WANDB_DISABLE_GIT", "true")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Embedded datasets are built once per test session in a temporary cache, never in the user's home."""
    cache = tmp_path_factory.getbasetemp() / "vp_lightning_cache"
    monkeypatch.setenv("VP_LIGHTNING_CACHE", str(cache))
    # a wandb-core started by an earlier test must not be inherited by the training subprocesses of this one
    monkeypatch.delenv("WANDB_SERVICE", raising=False)
