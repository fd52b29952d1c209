"""A grid of originals (top) and reconstructions (bottom) after each validation."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only

from vp_lightning.callbacks.token_usage import run_dir, wandb_run


class ReconstructionGrid(L.Callback):
    """Saves ``samples/val_stepXXXXXXX.png`` in the run folder and logs it to W&B.

    Args:
        num_images: images from the first validation batch (rank 0) to show.
    """

    def __init__(self, num_images: int = 8):
        super().__init__()
        self.num_images = num_images
        self._pair: tuple[torch.Tensor, torch.Tensor] | None = None

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx == 0 and isinstance(outputs, dict) and outputs.get("x") is not None and outputs["x"].ndim == 4:
            n = self.num_images
            self._pair = (outputs["x"][:n].detach().cpu(), outputs["x_hat"][:n].detach().cpu())

    @rank_zero_only
    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self._pair is None or trainer.sanity_checking:
            return
        from torchvision.utils import make_grid, save_image

        x, x_hat = self._pair
        self._pair = None
        images = torch.cat([x, x_hat.clamp(-1, 1)])
        if images.shape[-1] < 128:  # small crops are upscaled (nearest) so that the grid is readable
            images = torch.nn.functional.interpolate(images, scale_factor=128 // images.shape[-1], mode="nearest")
        grid = make_grid(images, nrow=len(x), normalize=True, value_range=(-1, 1))
        out = run_dir(trainer) / "samples" / f"val_step{trainer.global_step:07d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        save_image(grid, out)
        run = wandb_run(trainer)
        if run is not None:
            import wandb

            run.log({"val/reconstructions": wandb.Image(str(out), caption="top: input, bottom: reconstruction"),
                     "trainer/global_step": trainer.global_step})
