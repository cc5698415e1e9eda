"""The user-facing API: load a checkpoint, caption images.

    from diffcap import Captioner
    captioner = Captioner.from_pretrained("runs/default/checkpoint")
    captioner.caption(["photo.jpg", pil_image], steps=20, guidance=0.0)
    captioner.samples("photo.jpg")  # the candidates `caption` chooses among, each with its trajectory
    for result in captioner.caption_stream(paths):  # a large collection in bounded memory; bad files reported
        print(result.path, result.caption if result.ok else result.error)

Trajectories have one representation for every front end: `TrajectoryStep.to_dict` is what the web app's
JSON API returns and `diffcap caption --trajectory --json` prints, and `format_trajectory` is the text the
CLI prints; both come from `trajectory_steps`, which the report uses too.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image

from diffcap.checkpoint import CheckpointError
from diffcap.data.images import ImageLoadError, load_image
from diffcap.encoders.base import ImageEncoder, build_encoder
from diffcap.models.denoiser import ImageFeatures
from diffcap.pipeline import (CaptionModel, Generation, choose_candidates, generate, load_model,
                              load_reranker)

ImageInput = str | Path | Image.Image
Errors = Literal["raise", "skip"]

log = logging.getLogger(__name__)


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
    chosen: bool = False  # the one of `Captioner.samples` that `Captioner.caption` keeps

    def to_dict(self) -> dict[str, Any]:
        return {"caption": self.caption, "chosen": self.chosen,
                "trajectory": [step.to_dict() for step in self.trajectory]}


@dataclass
class CaptionResult:
    """One image of `Captioner.caption_stream`: its caption, or why it has none."""

    path: str  # the file as given, or "<image N>" for an in-memory image
    caption: str | None  # None when the image could not be loaded
    error: str | None = None  # the reason, when caption is None
    candidates: list[str] = field(default_factory=list)  # with candidates = N > 1: the N samples it was chosen from

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        """{"path", "caption"} (+ "candidates" when sampled; "error" instead of "caption" for a failure)."""
        if not self.ok:
            return {"path": self.path, "error": self.error}
        record: dict[str, Any] = {"path": self.path, "caption": self.caption}
        if self.candidates:
            record["candidates"] = self.candidates
        return record


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
    def __init__(self, model: CaptionModel, encoder: ImageEncoder, reranker: CaptionModel | None = None) -> None:
        """`reranker`: an autoregressive model on the same image features; with candidates = N > 1 it keeps the
        candidate it finds most likely instead of the minimum-Bayes-risk one (`load_reranker`)."""
        self.model = model
        self.encoder = encoder
        self.reranker = reranker

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu",
                        rerank: str | Path | None = None) -> Captioner:
        """Rebuild the model and its image encoder from a checkpoint directory (and the autoregressive model at
        `rerank`, if given, to choose among candidates)."""
        model, meta = load_model(Path(directory))
        encoder = build_encoder(model.config.encoder.name)
        expected = meta.get("encoder")
        if expected is not None and expected != encoder.identity():
            raise CheckpointError(
                f"{directory} was trained on features of a different image encoder or preprocessing than "
                f"{model.config.encoder.name!r} provides here (stored {expected}, found {encoder.identity()})"
            )
        reranker = None if rerank is None else load_reranker(Path(rerank), model, meta)
        for m in (model, reranker):
            if m is not None:
                m.denoiser.to(device)
                m.space.to(device)
        encoder.to(device)
        return cls(model, encoder, reranker)

    @torch.no_grad()
    def features(self, images: Sequence[ImageInput]) -> ImageFeatures:
        pil = [load_image(image) for image in images]
        device = next(self.model.denoiser.parameters()).device
        pixels = self.encoder.preprocess(pil).to(device)
        out = self.encoder(pixels)
        return ImageFeatures(out.pooled.float(), out.grid.float())

    def caption(self, images: Sequence[ImageInput] | ImageInput, *, steps: int | None = None,
                guidance: float | None = None, batch_size: int = 32, seed: int | None = None,
                candidates: int | None = None, select: str | None = None, match_weight: float | None = None,
                self_weight: float | None = None, errors: Errors = "raise") -> list[str | None]:
        """One caption per image (paths or PIL images); defaults come from the checkpoint's sample config.
        `candidates` = N > 1 samples N captions per image and keeps one: by `select` "mbr" the minimum-Bayes-risk
        one, by "match" the one the checkpoint's image–text matcher prefers; with a reranker, the one it finds
        most likely (plus `match_weight` x the matcher's cosine); `self_weight` > 0 subtracts that weight x the
        model's own denoising cross-entropy of each candidate from the matcher's cosine, wherever it counts.

        `errors="raise"` (default): an image that cannot be loaded raises ImageLoadError naming it and why.
        `errors="skip"`: its caption is None, a warning names it and its reason, and every other image is
        captioned.
        """
        if errors not in ("raise", "skip"):
            raise ValueError(f"errors must be 'raise' or 'skip', got {errors!r}")
        if isinstance(images, (str, Path, Image.Image)):
            images = [images]
        out: list[str | None] = []
        for result in self.caption_stream(images, steps=steps, guidance=guidance, batch_size=batch_size, seed=seed,
                                          candidates=candidates, select=select, match_weight=match_weight,
                                          self_weight=self_weight):
            if not result.ok:
                if errors == "raise":
                    raise ImageLoadError(result.path, result.error or "")
                log.warning("skipped %s: %s", result.path, result.error)
            out.append(result.caption)
        return out

    def caption_stream(self, images: Iterable[ImageInput], *, indices: Iterable[int] | None = None,
                       steps: int | None = None, guidance: float | None = None, batch_size: int = 32,
                       seed: int | None = None, candidates: int | None = None, select: str | None = None,
                       match_weight: float | None = None, self_weight: float | None = None) -> Iterator[CaptionResult]:
        """Caption `images` a batch at a time, yielding one CaptionResult per image in order: memory stays
        bounded by `batch_size` whatever the number of images, and an image that cannot be loaded becomes a
        result with its `error` instead of stopping the rest.

        Image k starts from the noise of `indices[k]` (default: k), as the k-th image of `caption()` does, so a
        resumed run that passes each image's index in the whole collection gives the same captions.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if self.reranker is not None and (self.model.config.sample.candidates if candidates is None else candidates) < 2:
            raise ValueError("re-ranking chooses among several samples: give candidates N (N >= 2)")
        choice = dict(candidates=candidates, select=select, match_weight=match_weight, self_weight=self_weight)
        order = iter(indices) if indices is not None else None
        batch: list[tuple[int, ImageInput]] = []
        for k, image in enumerate(images):
            batch.append((next(order) if order is not None else k, image))
            if len(batch) == batch_size:
                yield from self._caption_batch(batch, steps, guidance, seed, choice)
                batch = []
        if batch:
            yield from self._caption_batch(batch, steps, guidance, seed, choice)

    def _caption_batch(self, batch: list[tuple[int, ImageInput]], steps: int | None, guidance: float | None,
                       seed: int | None, choice: dict[str, Any]) -> list[CaptionResult]:
        results: list[CaptionResult] = []
        loaded: list[tuple[int, Image.Image]] = []
        for index, image in batch:
            name = f"<image {index}>" if isinstance(image, Image.Image) else str(image)
            try:
                loaded.append((index, load_image(image)))
                results.append(CaptionResult(name, None))
            except ImageLoadError as exc:
                results.append(CaptionResult(name, None, exc.reason))
        if loaded:
            gen = generate(self.model, self.features([image for _, image in loaded]), steps=steps, guidance=guidance,
                           seed=seed, indices=[index for index, _ in loaded], reranker=self.reranker, **choice)
            ok = [r for r in results if r.ok]
            for k, result in enumerate(ok):
                result.caption = gen.captions[k]
                result.candidates = gen.candidates[k] if gen.candidates else []
        return results

    def trajectory(self, image: ImageInput, *, steps: int | None = None, guidance: float | None = None,
                   seed: int | None = None, index: int = 0) -> list[TrajectoryStep]:
        """The rounded prediction at every denoising step: watch words crystallise from noise.

        It ends in the caption `caption(images)` gives this image when it is the `index`-th of the list: with
        several candidates (the checkpoint's `sample.candidates`), the trajectory of the one it keeps.
        """
        samples = self.samples(image, steps=steps, guidance=guidance, seed=seed, index=index)
        return next(sample for sample in samples if sample.chosen).trajectory

    def samples(self, image: ImageInput, n: int | None = None, *, steps: int | None = None,
                guidance: float | None = None, seed: int | None = None, index: int = 0, trajectory: bool = True,
                select: str | None = None, match_weight: float | None = None,
                self_weight: float | None = None) -> list[Sample]:
        """The `n` candidates `caption()` draws for this image, each with its trajectory, the one it keeps marked.

        Sample k is candidate k of `caption(images, candidates=n)` when the image is the `index`-th of the list
        (noise of seed + k at that index), and the sample with `chosen` True is the caption that call returns,
        by the same choice (the checkpoint's, unless `select`, `match_weight` or `self_weight` say otherwise;
        the captioner's reranker if it has one). `n` defaults to the checkpoint's `sample.candidates`, so by
        default the chosen sample is what `caption(image)` and `diffcap caption` print.
        """
        s = self.model.config.sample
        n = (1 if self.model.autoregressive else s.candidates) if n is None else n
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        base = s.seed if seed is None else seed
        features = self.features([image])
        gens = [generate(self.model, features, steps=steps, guidance=guidance, seed=base + k, first_index=index,
                         keep_trajectory=trajectory, candidates=1) for k in range(n)]
        captions = [gen.captions[0] for gen in gens]
        chosen = 0
        if n > 1 and not self.model.autoregressive:
            (chosen,) = choose_candidates(self.model, features, [captions], rows=[index], seed=base,
                                          reranker=self.reranker, select=select, match_weight=match_weight,
                                          self_weight=self_weight)
        return [Sample(caption, trajectory_steps(self.model, gen) if trajectory else [], chosen=k == chosen)
                for k, (caption, gen) in enumerate(zip(captions, gens))]

    def unconditional(self, n: int = 1, *, steps: int | None = None, seed: int | None = None) -> list[str]:
        """Captions sampled with no image at all (the model's learned caption prior)."""
        return generate(self.model, None, batch=n, steps=steps, seed=seed).captions
