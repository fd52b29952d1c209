"""CodebookFitting: monitoring fits before validation, the frozen final fit, final.ckpt, and no-op elsewhere."""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, Dataset

from vp_lightning.callbacks.codebook_fit import CodebookFitting
from vp_lightning.quantizers.fsp import FSP
from vp_lightning.quantizers.vp import VectorPerturbation


class RandomVectors(Dataset):
    """(3, 4) inputs: 4 positions of 3 channels; optionally dict batches with a padding mask."""

    def __init__(self, n=64, as_dict=False):
        self.x = torch.randn(n, 3, 4, generator=torch.Generator().manual_seed(0))
        self.as_dict = as_dict

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i]} if self.as_dict else self.x[i]


class TinyTokenizer(L.LightningModule):
    """A Linear encoder/decoder around a quantizer: enough to drive the callback."""

    def __init__(self, quantizer, as_dict=False):
        super().__init__()
        self.quantizer = quantizer
        self.enc = nn.Linear(3, quantizer.dim)
        self.dec = nn.Linear(quantizer.dim, 3)
        self.as_dict = as_dict
        self.encoded = 0

    def encode_latents(self, x):  # (b, 3, n) -> (b, n, d)
        self.encoded += x.shape[0]
        return self.enc(x.transpose(1, 2)).float()

    def step(self, batch):
        x = batch["x"] if isinstance(batch, dict) else batch
        out = self.quantizer(self.encode_latents(x))
        return nn.functional.mse_loss(self.dec(out.quantized).transpose(1, 2), x) + out.loss

    def training_step(self, batch, batch_idx):
        return self.step(batch)

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.step(batch))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)

    def train_dataloader(self):
        return DataLoader(RandomVectors(as_dict=self.as_dict), batch_size=8)

    def val_dataloader(self):
        return DataLoader(RandomVectors(16, as_dict=self.as_dict), batch_size=8)


def _trainer(tmp_path, callback, max_steps=4):
    return L.Trainer(
        default_root_dir=tmp_path,
        max_steps=max_steps,
        val_check_interval=2,
        limit_val_batches=1,
        num_sanity_val_steps=1,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback, ModelCheckpoint(dirpath=tmp_path / "ckpts")],
    )


def _vp():
    # K = 8, M = round(4 · 2) = 8: a queue of 64 latents
    return VectorPerturbation(dim=2, codebook_size=8, cluster_size_rate=4, k=2, push_prob=0.5)


@pytest.mark.parametrize("as_dict", [False, True])
def test_monitoring_and_final_fit(tmp_path, as_dict):
    torch.manual_seed(0)
    callback = CodebookFitting(latents_per_code=10, progress_bar=False)
    model = TinyTokenizer(_vp(), as_dict=as_dict)
    trainer = _trainer(tmp_path, callback)
    trainer.fit(model)

    stages = [entry["stage"] for entry in callback.history]
    assert stages == ["monitor", "monitor", "final"]  # two validations (not the sanity check), then the final fit
    q = model.quantizer
    assert bool(q.codebook_fitted) and bool(q.codebook_frozen)
    assert q.last_fit is not None and int(q.last_fit.counts.sum()) >= 10 * 8  # >= latents_per_code * K latents
    final = callback.history[-1]
    assert final["quantization_error"] > 0 and final["eta_ratio"] > 0
    assert callback.final_checkpoint_path == str(tmp_path / "ckpts" / "final.ckpt")

    # The final checkpoint carries the frozen codebook; validation from it leaves the codebook alone.
    state = torch.load(callback.final_checkpoint_path, weights_only=False)["state_dict"]
    assert torch.equal(state["quantizer.codebook"], q.codebook) and bool(state["quantizer.codebook_frozen"])
    fresh = TinyTokenizer(_vp(), as_dict=as_dict)
    validator = _trainer(tmp_path / "v", CodebookFitting(progress_bar=False))
    validator.validate(fresh, ckpt_path=callback.final_checkpoint_path, verbose=False)
    assert torch.equal(fresh.quantizer.codebook, q.codebook)


def test_monitoring_values_are_logged(tmp_path):
    torch.manual_seed(0)
    model = TinyTokenizer(_vp())
    trainer = _trainer(tmp_path, CodebookFitting(final_fit=False, progress_bar=False), max_steps=2)
    trainer.fit(model)
    assert "val/codebook/quantization_error" in trainer.callback_metrics
    assert "val/codebook/eta_ratio" in trainer.callback_metrics
    assert not (tmp_path / "ckpts" / "final.ckpt").exists()
    assert not bool(model.quantizer.codebook_frozen)


def test_max_batches_caps_collection_and_small_data_warns(tmp_path):
    torch.manual_seed(0)
    callback = CodebookFitting(monitor_on_validation=False, latents_per_code=50, max_batches=3, progress_bar=False)
    model = TinyTokenizer(_vp())
    trainer = _trainer(tmp_path, callback, max_steps=1)
    with pytest.warns(UserWarning, match="fewer than latents_per_code"):
        trainer.fit(model)
    # 3 batches of 8 samples · 4 positions = 96 latents < 50 · 8 wanted
    assert int(model.quantizer.last_fit.counts.sum()) == 96
    assert model.encoded == 8 + 8 + 3 * 8  # sanity-check batch, one training batch, three batches for the fit


def test_resuming_training_unfreezes(tmp_path):
    torch.manual_seed(0)
    model = TinyTokenizer(_vp())
    model.quantizer.fit_codebook(torch.randn(100, 2), freeze=True)
    trainer = _trainer(tmp_path, CodebookFitting(final_fit=False, progress_bar=False), max_steps=2)
    trainer.fit(model)
    assert not bool(model.quantizer.codebook_frozen)
    assert trainer.callbacks[0].history[0]["stage"] == "monitor"


def test_noop_for_quantizers_without_codebook_fitting(tmp_path):
    torch.manual_seed(0)
    callback = CodebookFitting(progress_bar=False)
    model = TinyTokenizer(FSP([4, 3]))
    trainer = _trainer(tmp_path, callback)
    trainer.fit(model)
    assert callback.history == [] and callback.final_checkpoint_path is None
    assert not (tmp_path / "ckpts" / "final.ckpt").exists()
    assert model.encoded == 8 * 4 + 8 * 1 * 3  # training and validation batches only (sanity + 2 validations)


def test_bad_options_are_rejected():
    with pytest.raises(ValueError, match="latents_per_code"):
        CodebookFitting(latents_per_code=0)
    with pytest.raises(ValueError, match="max_batches"):
        CodebookFitting(max_batches=0)


@pytest.mark.slow
def test_real_tokenizer_module_with_vp(tmp_path):
    """A few steps of the project's TokenizerModule with VP, token usage and the codebook callback."""
    import functools

    from torch.utils.data import TensorDataset

    from vp_lightning.callbacks import TokenUsageMonitor
    from vp_lightning.losses import ImageReconstructionLoss
    from vp_lightning.models import TokenizerModule
    from vp_lightning.networks import tiny_image_autoencoder

    torch.manual_seed(0)
    enc, dec = tiny_image_autoencoder()
    model = TokenizerModule(
        encoder=enc,
        decoder=dec,
        quantizer=functools.partial(VectorPerturbation, dim=4, codebook_size=16, cluster_size_rate=2, push_prob=0.5),
        loss=ImageReconstructionLoss(l1=1.0, l2=0.5),
    )
    x = torch.rand(16, 3, 16, 16) * 2 - 1
    callback = CodebookFitting(latents_per_code=20, progress_bar=False)
    trainer = L.Trainer(
        default_root_dir=tmp_path, max_steps=4, val_check_interval=2, limit_val_batches=1, num_sanity_val_steps=0,
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[callback, TokenUsageMonitor(train_window=2, plot=False), ModelCheckpoint(dirpath=tmp_path / "c")],
    )
    trainer.fit(model, DataLoader(TensorDataset(x), batch_size=4), DataLoader(x, batch_size=4))
    assert [e["stage"] for e in callback.history] == ["monitor", "monitor", "final"]
    assert bool(model.quantizer.codebook_frozen)
    for key in ("train/quantizer/accept_rate", "val/codebook/perplexity", "val/codebook/quantization_error"):
        assert key in trainer.callback_metrics, key
    # 16 images of 4x4 tokens = 256 latents >= 20 · 16 would need 320: all of the training set is used
    assert int(model.quantizer.last_fit.counts.sum()) == 256
    result = trainer.validate(model, DataLoader(x, batch_size=4), ckpt_path=callback.final_checkpoint_path, verbose=False)
    assert result[0]["val/codebook/perplexity"] > 1


class _DumpCodebook(L.Callback):
    """Saves each rank's final codebook and fit history (runs after CodebookFitting's on_train_end)."""

    def __init__(self, out_dir):
        self.out_dir = out_dir

    def on_train_end(self, trainer, pl_module):
        fitting = next(c for c in trainer.callbacks if isinstance(c, CodebookFitting))
        q = pl_module.quantizer
        torch.save(
            {"codebook": q.codebook.clone(), "frozen": bool(q.codebook_frozen), "history": fitting.history},
            f"{self.out_dir}/rank{trainer.global_rank}.pt",
        )


@pytest.mark.slow
def test_ddp_ranks_end_with_the_same_final_codebook(tmp_path):
    torch.manual_seed(0)
    model = TinyTokenizer(_vp())
    trainer = L.Trainer(
        default_root_dir=tmp_path, max_steps=4, val_check_interval=2, limit_val_batches=1, num_sanity_val_steps=0,
        accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False, enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[CodebookFitting(latents_per_code=10, progress_bar=False), _DumpCodebook(str(tmp_path)),
                   ModelCheckpoint(dirpath=tmp_path / "ckpts")],
    )
    trainer.fit(model)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert torch.equal(r0["codebook"], r1["codebook"]) and r0["frozen"] and r1["frozen"]
    assert [e["stage"] for e in r0["history"]] == ["monitor", "monitor", "final"]
    assert r0["history"][-1]["quantization_error"] == pytest.approx(r1["history"][-1]["quantization_error"])
    assert (tmp_path / "ckpts" / "final.ckpt").exists()
