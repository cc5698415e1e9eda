"""The user-facing API: load a checkpoint, caption images.

    from diffcap import Captioner
    captioner = Captioner.from_pretrained("runs/default/checkpoint")
    captioner.caption(["photo.jpg", pil_image], steps=20, guidance=0.0)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from diffcap.checkpoint import CheckpointError
from diffcap.data.images import load_image
from diffcap.encoders.base import ImageEncoder, build_encoder
from diffcap.models.denoiser import ImageFeatures
from diffcap.pipeline import CaptionModel, generate, load_model

ImageInput = str | Path | Image.Image


@dataclass
class TrajectoryStep:
    t: int  # diffusion timestep of this step
    caption: str  # the rounded prediction of x0 at this step
    tokens: list[tuple[str, float]]  # (word piece, confidence) at each position up to the caption's end


class Captioner:
    def __init__(self, model: CaptionModel, encoder: ImageEncoder) -> None:
        self.model = model
        self.encoder = encoder

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> Captioner:
        """Rebuild the model and its image encoder from a checkpoint directory."""
        model, meta = load_model(Path(directory))
        encoder = build_encoder(model.config.encoder.name)
        expected = meta.get("encoder")
        if expected is not None and expected != encoder.identity():
            raise CheckpointError(
                f"{directory} was trained on features of a different image encoder or preprocessing than "
                f"{model.config.encoder.name!r} provides here (stored {expected}, found {encoder.identity()})"
            )
        model.denoiser.to(device)
        model.space.to(device)
        encoder.to(device)
        return cls(model, encoder)

    @torch.no_grad()
    def features(self, images: Sequence[ImageInput]) -> ImageFeatures:
        pil = [load_image(image) for image in images]
        device = next(self.model.denoiser.parameters()).device
        pixels = self.encoder.preprocess(pil).to(device)
        out = self.encoder(pixels)
        return ImageFeatures(out.pooled.float(), out.grid.float())

    def caption(self, images: Sequence[ImageInput] | ImageInput, *, steps: int | None = None,
                guidance: float | None = None, batch_size: int = 32, seed: int | None = None) -> list[str]:
        """One caption per image (paths or PIL images); defaults come from the checkpoint's sample config."""
        if isinstance(images, (str, Path, Image.Image)):
            images = [images]
        captions: list[str] = []
        for start in range(0, len(images), batch_size):
            chunk = list(images[start: start + batch_size])
            captions += generate(self.model, self.features(chunk), steps=steps, guidance=guidance, seed=seed,
                                 first_index=start).captions
        return captions

    def trajectory(self, image: ImageInput, *, steps: int | None = None, guidance: float | None = None,
                   seed: int | None = None, index: int = 0) -> list[TrajectoryStep]:
        """The rounded prediction at every denoising step: watch words crystallise from noise.

        It ends in the caption `caption(images)` gives this image when it is the `index`-th of the list.
        """
        gen = generate(self.model, self.features([image]), steps=steps, guidance=guidance, seed=seed,
                       first_index=index, keep_trajectory=True)
        out = []
        for t, captions, confidence in gen.trajectory:
            out.append(TrajectoryStep(t, captions[0], self._tokens(captions[0], confidence[0])))
        return out

    def _tokens(self, caption: str, confidence: torch.Tensor) -> list[tuple[str, float]]:
        pieces = self.model.space.tokenizer.tokenize(caption)[: len(confidence)]
        return [(p, round(float(c), 3)) for p, c in zip(pieces, confidence)]

    def unconditional(self, n: int = 1, *, steps: int | None = None, seed: int | None = None) -> list[str]:
        """Captions sampled with no image at all (the model's learned caption prior)."""
        return generate(self.model, None, batch=n, steps=steps, seed=seed).captions
