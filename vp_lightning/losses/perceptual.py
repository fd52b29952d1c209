"""LPIPS with an explicit weights policy: never downloads, fails at start-up naming the missing file."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

# torchvision file names of the ImageNet trunks LPIPS builds on (they live in $TORCH_HOME/hub/checkpoints).
TRUNK_FILES = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth"}
TRUNK_URLS = {
    "alex": "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
    "vgg": "https://download.pytorch.org/models/vgg16-397923af.pth",
}


class MissingWeightsError(FileNotFoundError):
    """Pretrained weights are not on disk (nothing is downloaded at run time)."""


def resolve_trunk_weights(net: str, weights: str) -> Path | None:
    """Where the trunk weights come from.

    Args:
        net: ``"alex"`` or ``"vgg"``.
        weights: ``"hub"`` (torch hub cache), ``"random"`` (random trunk, tests only) or a path to a ``.pth`` file.
    Returns:
        The file to load, or ``None`` for a random trunk.
    Raises:
        MissingWeightsError: the file does not exist; the message names it and where to put it.
    """
    if net not in TRUNK_FILES:
        raise ValueError(f"LPIPS net must be one of {sorted(TRUNK_FILES)}, got {net!r}")
    if weights == "random":
        return None
    if weights == "hub":
        path = Path(torch.hub.get_dir()) / "checkpoints" / TRUNK_FILES[net]
        hint = (
            f"download {TRUNK_URLS[net]} on a machine with network access and copy it to {path} "
            f"(or set TORCH_HOME), pass an explicit path with lpips_weights=/path/to/{TRUNK_FILES[net]}, "
            "or disable LPIPS (weight 0 / lpips: false)"
        )
    else:
        path = Path(os.path.expanduser(weights))
        hint = f"check the path, or use lpips_weights=hub with {TRUNK_FILES[net]} in $TORCH_HOME/hub/checkpoints"
    if not path.is_file():
        raise MissingWeightsError(f"LPIPS trunk weights not found: {path}. To fix: {hint}.")
    return path


class LPIPS(nn.Module):
    """Frozen LPIPS distance (Zhang et al. 2018) on images in [-1, 1].

    Args:
        net: trunk, ``"alex"`` (default) or ``"vgg"``.
        weights: ``"hub"``, ``"random"`` or a file path; see :func:`resolve_trunk_weights`.
    """

    def __init__(self, net: str = "alex", weights: str = "hub"):
        super().__init__()
        import lpips  # heavy import, only when LPIPS is used

        trunk_file = resolve_trunk_weights(net, weights)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.lpips = lpips.LPIPS(net=net, pnet_rand=True, verbose=False)  # linear heads ship with the package
        if trunk_file is not None:
            self._load_trunk(net, trunk_file)
        self.weights = weights
        self.requires_grad_(False)
        self.eval()

    def _load_trunk(self, net: str, path: Path) -> None:
        import torchvision

        reference = torchvision.models.alexnet() if net == "alex" else torchvision.models.vgg16()
        reference.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        features = reference.features
        for slice_module in self.lpips.net.children():
            for name, layer in slice_module.named_children():
                layer.load_state_dict(features[int(name)].state_dict())

    def train(self, mode: bool = True) -> LPIPS:
        return super().train(False)  # always frozen: dropout off

    def forward(self, x_hat: Tensor, x: Tensor) -> Tensor:
        """(b, 3, h, w) images in [-1, 1] -> (b,) distances."""
        return self.lpips(x_hat.float(), x.float(), normalize=False).reshape(-1)
