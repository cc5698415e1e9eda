"""The diffusion captioner as one bundle: text space + denoiser + diffusion process, built from a Config.

Training builds it fresh (`build_model`); sampling and evaluation rebuild it from a checkpoint
(`load_model`), always from the config stored inside that checkpoint. `generate` is the one sampling path
both use, so what training evaluates is exactly what users get.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffcap.checkpoint import CheckpointError, load_checkpoint, prefixed, unprefixed
from diffcap.config import Config, ConfigError
from diffcap.diffusion.gaussian import GaussianDiffusion
from diffcap.models.denoiser import Denoiser, DenoiserShape, ImageFeatures
from diffcap.models.guidance import conditioned
from diffcap.text.space import TextSpace, load_backbone


def key_hash(key: str) -> int:
    """A signed 64-bit fingerprint of an image key."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little", signed=True)


def image_key_hashes(keys: Iterable[str]) -> torch.Tensor:
    """(N,) int64 fingerprints of image keys: a compact record of which images a model was trained on."""
    return torch.tensor(sorted({key_hash(k) for k in keys}), dtype=torch.int64)


@dataclass
class CaptionModel:
    config: Config
    space: TextSpace
    denoiser: Denoiser
    diffusion: GaussianDiffusion
    train_image_hashes: torch.Tensor | None = None  # (N,) image_key_hashes of the training images

    def tensors(self, denoiser_state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """What model.safetensors holds: denoiser weights (default: the live ones), text-space buffers and
        the fingerprints of the training images (for the leakage check of `evaluate`)."""
        state = denoiser_state if denoiser_state is not None else self.denoiser.state_dict()
        out = {**prefixed("denoiser", state), **prefixed("text", self.space.state_dict())}
        if self.train_image_hashes is not None:
            out["data.train_image_hashes"] = self.train_image_hashes
        return out

    def trained_on(self, keys: list[str]) -> list[str]:
        """The keys among `keys` that were training images of this model (empty when unknown)."""
        if self.train_image_hashes is None:
            return []
        seen = set(self.train_image_hashes.tolist())
        return [k for k in keys if key_hash(k) in seen]

    def meta(self) -> dict[str, Any]:
        return {"denoiser_shape": dataclasses.asdict(self.denoiser.shape), "text": self.space.describe()}


def denoiser_shape(config: Config, space: TextSpace, pooled_dim: int, grid_dim: int) -> DenoiserShape:
    _, backbone = load_backbone(config.text.backbone)
    bc = backbone.config
    hidden = getattr(bc, "hidden_size", None) or getattr(bc, "dim")
    heads = getattr(bc, "num_attention_heads", None) or getattr(bc, "n_heads")
    intermediate = getattr(bc, "intermediate_size", None) or getattr(bc, "hidden_dim")
    max_positions = getattr(bc, "max_position_embeddings", 512)
    if config.text.max_length > max_positions:
        raise ConfigError(f"text.max_length={config.text.max_length} exceeds the backbone's {max_positions} positions")
    m = config.model
    return DenoiserShape(
        latent_dim=space.dim, pooled_dim=pooled_dim, grid_dim=grid_dim, hidden=hidden, heads=heads,
        intermediate=intermediate, layers=m.layers, max_length=config.text.max_length, use_pooled=m.use_pooled,
        grid_pool=m.grid_pool, timestep_embedding=m.timestep_embedding, self_condition=m.self_condition,
        dropout=m.dropout, layer_norm_eps=getattr(bc, "layer_norm_eps", 1e-12),
    )


def build_model(config: Config, pooled_dim: int, grid_dim: int, captions: Iterable[str] | None = None) -> CaptionModel:
    """A fresh model; `captions` (training captions) define the rounding vocabulary when restricted."""
    t = config.text
    space = TextSpace.from_backbone(t.backbone, t.max_length, t.latent_scale, captions=captions,
                                    restrict_vocab=t.restrict_vocab)
    denoiser = Denoiser(denoiser_shape(config, space, pooled_dim, grid_dim))
    if config.model.init_from_backbone:
        _, backbone = load_backbone(t.backbone)
        denoiser.load_backbone(backbone.state_dict(), space.mean, space.std, t.latent_scale)
    diffusion = GaussianDiffusion.from_schedule(config.diffusion.schedule, config.diffusion.timesteps)
    return CaptionModel(config, space, denoiser, diffusion)


def load_model(directory: Path) -> tuple[CaptionModel, dict[str, Any]]:
    """Rebuild a model from a checkpoint directory (its own config, vocabulary and weights)."""
    config_dict, meta, tensors = load_checkpoint(directory)
    try:
        config = Config.from_dict(config_dict)
    except ConfigError as exc:
        raise CheckpointError(f"{directory}: its config.json is invalid: {exc}") from exc
    t = config.text
    space = TextSpace.from_state(t.backbone, t.max_length, t.latent_scale, unprefixed("text", tensors),
                                 fingerprint=meta.get("text", {}).get("fingerprint"))
    try:
        shape = DenoiserShape(**meta["denoiser_shape"])
        denoiser = Denoiser(shape)
        denoiser.load_state_dict(unprefixed("denoiser", tensors))
    except (KeyError, TypeError, RuntimeError) as exc:
        raise CheckpointError(f"{directory}: weights do not match the stored model shape ({exc})") from exc
    denoiser.eval()
    diffusion = GaussianDiffusion.from_schedule(config.diffusion.schedule, config.diffusion.timesteps)
    return CaptionModel(config, space, denoiser, diffusion, tensors.get("data.train_image_hashes")), meta


@dataclass
class Generation:
    captions: list[str]
    # per step: (t, rounded captions, per-position confidence (B, L), per-position word-piece index (B, L))
    # when a trajectory was asked for
    trajectory: list[tuple[int, list[str], torch.Tensor, torch.Tensor]]


@torch.no_grad()
def generate(
    model: CaptionModel,
    image: ImageFeatures | None,
    *,
    batch: int | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    clamp: bool | None = None,
    eta: float | None = None,
    time_difference: int | None = None,
    seed: int | None = None,
    collapse_repeats: bool | None = None,
    end_penalty: float | None = None,
    first_index: int = 0,
    keep_trajectory: bool = False,
) -> Generation:
    """Captions for a batch of image features (or `batch` unconditional ones when image is None)."""
    s = model.config.sample
    steps = s.steps if steps is None else steps
    guidance = s.guidance if guidance is None else guidance
    clamp = s.clamp if clamp is None else clamp
    if steps < 1 or steps > model.diffusion.num_timesteps:
        raise ValueError(f"steps must be between 1 and {model.diffusion.num_timesteps}, got {steps}")
    if guidance < 0:
        raise ValueError(f"guidance must be >= 0, got {guidance}")
    penalty = s.end_penalty if end_penalty is None else end_penalty
    B = len(image) if image is not None else (batch or 1)
    device = next(model.denoiser.parameters()).device
    base = s.seed if seed is None else seed
    generator = torch.Generator(device="cpu").manual_seed(base)  # fresh noise of eta > 0 steps
    shape = (B, model.space.max_length, model.space.dim)
    # Row i starts from noise seeded by (seed, first_index + i): the k-th image of a call gets the same caption
    # whatever the batch size, and different images get independent noise (a corpus score then averages
    # over many draws instead of resting on one).
    noise = torch.stack([
        torch.randn(shape[1:], generator=torch.Generator().manual_seed(base * 1_000_003 + first_index + i))
        for i in range(B)
    ])
    model.denoiser.eval()
    result = model.diffusion.sample(
        conditioned(model.denoiser, image, guidance),
        shape,
        steps,
        denoised_fn=(lambda x0: model.space.clamp(x0, penalty)) if clamp else None,
        self_condition=model.denoiser.shape.self_condition,
        eta=s.eta if eta is None else eta,
        time_difference=s.time_difference if time_difference is None else time_difference,
        generator=generator,
        device=device,
        keep_trajectory=keep_trajectory,
        noise=noise,
    )
    collapse = s.collapse_repeats if collapse_repeats is None else collapse_repeats
    ids = model.space.round(result.x0, penalty)
    trajectory = []
    for t, x0_hat in result.trajectory:
        probs = model.space.logits(x0_hat).softmax(-1)
        confidence, step_ids = probs.max(-1)
        trajectory.append((t, model.space.decode(step_ids, collapse), confidence, step_ids))
    return Generation(model.space.decode(ids, collapse), trajectory)
