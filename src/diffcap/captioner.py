"""The user-facing API: load a checkpoint, caption images.

    from diffcap import Captioner
    captioner = Captioner.from_pretrained("runs/default/checkpoint")
    captioner.caption(["photo.jpg", pil_image], steps=20, guidance=0.0)
    captioner.samples("photo.jpg", n=3)  # three captions, each with its denoising trajectory

Trajectories have one representation for every front end: `TrajectoryStep.to_dict` is what the web app's
JSON API returns and `diffcap caption --trajectory --json` prints, and `format_trajectory` is the text the
CLI prints; both come from `trajectory_steps`, which the report uses too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from diffcap.checkpoint import CheckpointError
from diffcap.data.images import load_image
from diffcap.encoders.base import ImageEncoder, build_encoder
from diffcap.models.denoiser import ImageFeatures
from diffcap.pipeline import CaptionModel, Generation, generate, load_model

ImageInput = str | Path | Image.Image


@dataclass
class TrajectoryStep:
    t: int  # diffusion timestep of this step
    caption: str  # the rounded prediction of x0 at this step
    # (word piece, confidence) of each word piece of `caption`, in order: the rounding's softmax probability of
    # the chosen piece (the largest over the positions a repeated piece was merged from)
    tokens: list[tuple[str, float]]

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (web API, `caption --trajectory --json`): {"t", "caption", "tokens": [{"token", "confidence"}]}."""
        return {"t": self.t, "caption": self.caption,
                "tokens": [{"token": piece, "confidence": conf} for piece, conf in self.tokens]}


@dataclass
class Sample:
    caption: str
    trajectory: list[TrajectoryStep]  # empty unless asked for

    def to_dict(self) -> dict[str, Any]:
        return {"caption": self.caption, "trajectory": [step.to_dict() for step in self.trajectory]}


def trajectory_steps(model: CaptionModel, generation: Generation, row: int = 0) -> list[TrajectoryStep]:
    """Row `row` of a `generate(..., keep_trajectory=True)` result as TrajectoryStep objects."""
    collapse = model.config.sample.collapse_repeats  # generate's default; decode merged repeats the same way
    space = model.space
    out = []
    for t, captions, confidence, ids in generation.trajectory:
        tokens: list[tuple[str, float]] = []
        previous = None
        for index, conf in zip(ids[row].tolist(), confidence[row].tolist()):
            if index in (space.sep_index, space.pad_index):
                break
            if collapse and index == previous:
                piece, best = tokens[-1]
                tokens[-1] = (piece, max(best, round(conf, 3)))
                continue
            piece = space.tokenizer.convert_ids_to_tokens(int(space.vocab_ids[index]))
            tokens.append((piece, round(conf, 3)))
            previous = index
        out.append(TrajectoryStep(int(t), captions[row], tokens))
    return out


def format_trajectory(steps: Sequence[TrajectoryStep], *, confidence: bool = False) -> list[str]:
    """Text lines, one per step: `t= 999  a dog runs` (with `confidence`: `a:0.93 dog:0.41 ...` after it)."""
    lines = []
    for step in steps:
        line = f"t={step.t:4d}  {step.caption}"
        if confidence:
            line += "   [" + " ".join(f"{piece}:{conf:.2f}" for piece, conf in step.tokens) + "]"
        lines.append(line)
    return lines


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
                guidance: float | None = None, batch_size: int = 32, seed: int | None = None,
                candidates: int | None = None) -> list[str]:
        """One caption per image (paths or PIL images); defaults come from the checkpoint's sample config.
        `candidates` = N > 1 samples N captions per image and keeps the minimum-Bayes-risk one."""
        if isinstance(images, (str, Path, Image.Image)):
            images = [images]
        captions: list[str] = []
        for start in range(0, len(images), batch_size):
            chunk = list(images[start: start + batch_size])
            captions += generate(self.model, self.features(chunk), steps=steps, guidance=guidance, seed=seed,
                                 first_index=start, candidates=candidates).captions
        return captions

    def trajectory(self, image: ImageInput, *, steps: int | None = None, guidance: float | None = None,
                   seed: int | None = None, index: int = 0) -> list[TrajectoryStep]:
        """The rounded prediction at every denoising step: watch words crystallise from noise.

        It ends in the caption `caption(images)` gives this image when it is the `index`-th of the list.
        """
        gen = generate(self.model, self.features([image]), steps=steps, guidance=guidance, seed=seed,
                       first_index=index, keep_trajectory=True, candidates=1)
        return trajectory_steps(self.model, gen)

    def samples(self, image: ImageInput, n: int = 1, *, steps: int | None = None, guidance: float | None = None,
                seed: int | None = None, trajectory: bool = True) -> list[Sample]:
        """`n` captions of one image from independent noise, in one batch, each with its trajectory.

        Sample k is the caption `caption(images)` gives this image when it is the k-th of the list, so the first
        is what `caption(image)` and `diffcap caption` print (unless the checkpoint's `sample.candidates` > 1 makes
        those a minimum-Bayes-risk choice among several samples: here every sample is shown instead).
        """
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        gen = generate(self.model, self.features([image]).repeat(n), steps=steps, guidance=guidance, seed=seed,
                       keep_trajectory=trajectory, candidates=1)
        return [Sample(caption, trajectory_steps(self.model, gen, row) if trajectory else [])
                for row, caption in enumerate(gen.captions)]

    def unconditional(self, n: int = 1, *, steps: int | None = None, seed: int | None = None) -> list[str]:
        """Captions sampled with no image at all (the model's learned caption prior)."""
        return generate(self.model, None, batch=n, steps=steps, seed=seed).captions
