"""CLIP vision encoder (transformers ``CLIPVisionModelWithProjection``).

Built from a Hugging Face model id or local directory (loaded from local files
only unless ``allow_download=True``; a full CLIP checkpoint works too) or from
a ``CLIPVisionConfig`` (random weights, used by the tests).

Features: ``pooled`` is the projected, L2-normalised ``image_embeds``
(B, projection_dim); ``grid`` is the last hidden state's patch tokens without
the CLS token (B, (image_size // patch_size) ** 2, hidden_size).

Preprocessing follows CLIP: bicubic resize of the shortest side to
``config.image_size``, centre crop, OpenAI CLIP mean/std.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from diffcap.encoders.base import (
    EncoderOutput,
    ImageEncoder,
    ImageTransform,
    sha256_state_dict,
)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipEncoder(ImageEncoder):
    """Frozen CLIP vision tower: pooled (B, projection_dim), grid (B, N, hidden_size)."""

    def __init__(
        self,
        model_id_or_config: str | Path | CLIPVisionConfig,
        *,
        allow_download: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(model_id_or_config, CLIPVisionConfig):
            self.model_id = "random-init:" + model_id_or_config.model_type
            self.model = CLIPVisionModelWithProjection(model_id_or_config)
        else:
            self.model_id = str(model_id_or_config)
            self.model = _load_pretrained(self.model_id, allow_download)
        config = self.model.config
        self.name = "clip"
        self.pooled_dim = int(config.projection_dim)
        self.grid_dim = int(config.hidden_size)
        self.grid_size = int(config.image_size) // int(config.patch_size)
        self.transform = ImageTransform(
            size=int(config.image_size),
            mean=CLIP_MEAN,
            std=CLIP_STD,
            resize="shortest_side_center_crop",
        )
        self._weights_sha256 = sha256_state_dict(self.model.state_dict())
        self.freeze()

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        return self.transform(images)  # (B, 3, S, S)

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> EncoderOutput:
        out = self.model(pixel_values=pixels)
        pooled = F.normalize(out.image_embeds, dim=-1)  # (B, projection_dim)
        grid = out.last_hidden_state[:, 1:, :]  # (B, N, hidden_size), CLS dropped
        return EncoderOutput(pooled=pooled, grid=grid)

    def identity(self) -> dict[str, object]:
        return {
            "encoder": self.name,
            "model_id": self.model_id,
            "weights_sha256": self._weights_sha256,
            "pooled_dim": self.pooled_dim,
            "grid_dim": self.grid_dim,
            "grid_size": self.grid_size,
            **self.transform.identity(),
        }


def _load_pretrained(model_id: str, allow_download: bool) -> CLIPVisionModelWithProjection:
    try:
        return CLIPVisionModelWithProjection.from_pretrained(
            model_id, local_files_only=not allow_download
        )
    except OSError as exc:
        hint = "" if allow_download else " (downloads are disabled: pass a local directory)"
        raise OSError(f"cannot load CLIP model {model_id!r}{hint}: {exc}") from exc
