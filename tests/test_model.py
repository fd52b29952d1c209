"""TokenizerModule on tiny networks and synthetic tensors: steps, logged keys, optimizer defaults, errors."""

import functools

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from vp_lightning.callbacks import TokenUsageMonitor
from vp_lightning.losses import ImageReconstructionLoss
from vp_lightning.metrics import ImageQuality
from vp_lightning.models import TokenizerModule
from vp_lightning.models.tokenizer import token_mask_from_sample_mask, unpack_batch
from vp_lightning.networks import tiny_image_autoencoder
from vp_lightning.quantizers import FSQ, VectorQuantizer


def tiny_module(quantizer=None, **kwargs):
    enc, dec = tiny_image_autoencoder()
    return TokenizerModule(
        encoder=enc,
        decoder=dec,
        quantizer=quantizer or functools.partial(FSQ, levels=[8, 5, 5, 5]),
        loss=ImageReconstructionLoss(l1=1.0, l2=0.5),
        quality=ImageQuality(),
        **kwargs,
    )


class _Images(L.LightningDataModule):
    def __init__(self, n=16):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.x = torch.rand(n, 3, 16, 16, generator=g) * 2 - 1

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.x), batch_size=4)

    def val_dataloader(self):
        return DataLoader(self.x, batch_size=4)


def test_forward_shapes_and_projections():
    model = tiny_module()
    model.configure_model()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    x_hat, out = model(x)
    assert x_hat.shape == x.shape
    assert out.indices.shape == (2, 4, 4)
    assert model.proj_in.out_features == 4 and model.proj_out.in_features == 4
    assert model.encode_latents(x).shape == (2, 4, 4, 4)
    assert model.tokenize(x).shape == (2, 4, 4)


def test_default_optimizer_is_vqgan_adam():
    model = tiny_module()
    model.configure_model()
    opt = model.configure_optimizers()
    assert isinstance(opt, torch.optim.Adam)
    assert opt.param_groups[0]["betas"] == (0.5, 0.9)


def test_lr_scheduler_is_wired():
    model = tiny_module(
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
        lr_scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1),
    )
    model.configure_model()
    conf = model.configure_optimizers()
    assert conf["lr_scheduler"]["interval"] == "step"


@pytest.mark.parametrize("quantizer", [None, functools.partial(VectorQuantizer, dim=4, codebook_size=32)])
def test_training_logs_named_terms_and_usage(tmp_path, quantizer):
    model = tiny_module(quantizer)
    trainer = L.Trainer(
        max_steps=4, val_check_interval=2, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, callbacks=[TokenUsageMonitor(train_window=2, plot=False)],
        default_root_dir=tmp_path, num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=_Images())
    keys = set(trainer.callback_metrics)
    for key in ["train/loss/l1", "train/loss/l2", "train/loss/quantizer", "train/loss/total", "val/loss/rec",
                "val/psnr", "val/ssim", "val/codebook/perplexity", "val/codebook/cvu", "val/codebook/utilization",
                "val/codebook/dead_codes", "train/codebook/perplexity"]:
        assert key in keys, key
    usage = trainer.callbacks[0].last_counts["val"]
    assert int(usage.sum()) == 16 * 4 * 4  # every validation token counted once


def test_parameters_change_when_training(tmp_path):
    model = tiny_module()
    model.configure_model()
    before = [p.detach().clone() for p in model.parameters()]
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, limit_val_batches=0)
    trainer.fit(model, datamodule=_Images())
    changed = [not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True)]
    assert all(changed)  # the gradient reaches encoder, projections and decoder


def test_batch_formats_and_token_masks():
    x = torch.zeros(2, 1, 10)
    assert unpack_batch(x)[0] is x
    assert unpack_batch((x, torch.zeros(2)))[0] is x
    mask = torch.ones(2, 1, 10)
    mask[1, :, 5:] = 0
    assert unpack_batch({"x": x, "mask": mask})[1] is mask
    mask[1, :, 5:] = 0  # 5 real samples: token 2 (samples 4-5) is half real and counts, tokens 3-4 do not
    tokens = token_mask_from_sample_mask(mask, (5,))  # 2 samples per token
    assert tokens.tolist() == [[True] * 5, [True, True, True, False, False]]
    mask[1, :, 4:] = 0
    assert token_mask_from_sample_mask(mask, (5,))[1].tolist() == [True, True, False, False, False]


def test_encoder_without_out_channels_is_rejected():
    with pytest.raises(TypeError, match="out_channels"):
        TokenizerModule(torch.nn.Identity(), torch.nn.Identity(), FSQ, ImageReconstructionLoss())


def test_nonfinite_loss_names_step_and_term():
    model = tiny_module()
    model.configure_model()
    x = torch.full((2, 3, 16, 16), float("nan"))
    with pytest.raises(FloatingPointError, match="step 0.*l1"):
        model.training_step(x, 0)


class _OneNaNBatch(_Images):
    def train_dataloader(self):
        x = self.x.clone()
        x[4:8] = float("nan")  # the second batch
        return DataLoader(x, batch_size=4)


def test_nonfinite_step_is_skipped_when_configured(tmp_path):
    model = tiny_module(on_nonfinite_loss="skip")
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, limit_val_batches=0, max_epochs=1)
    trainer.fit(model, datamodule=_OneNaNBatch())
    assert model.skipped_nonfinite_steps == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the NaN batch never reached the weights


def test_nonfinite_loss_stops_training_by_default(tmp_path):
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, limit_val_batches=0, max_epochs=1)
    with pytest.raises(FloatingPointError, match="step 1"):
        trainer.fit(tiny_module(), datamodule=_OneNaNBatch())
