"""The diffusion captioner as one bundle: text space + denoiser + diffusion process, built from a Config.

Training builds it fresh (`build_model`); sampling and evaluation rebuild it from a checkpoint
(`load_model`), always from the config stored inside that checkpoint. `generate` is the one sampling path
both use, so what training evaluates is exactly what users get.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from diffcap.checkpoint import (CheckpointError, load_checkpoint, load_train_state, prefixed, save_checkpoint,
                                unprefixed)
from diffcap.config import Config, ConfigError, apply_overrides, validate
from diffcap.diffusion.gaussian import GaussianDiffusion
from diffcap.losses import caption_losses, decoder_losses, self_critical_loss
from diffcap.models.autoregressive import CaptionDecoder, DecoderShape
from diffcap.models.denoiser import Denoiser, DenoiserShape, ImageFeatures
from diffcap.models.guidance import conditioned
from diffcap.models.length import LengthPredictor, caption_lengths
from diffcap.models.matching import ImageTextMatcher, fit_matcher
from diffcap.rewards import CiderD
from diffcap.selection import mbr_select
from diffcap.text.retrieval import RetrievalMemory, sentence_vectors
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
    # the trained network: a Denoiser, or a CaptionDecoder when config.model.kind == "autoregressive"
    denoiser: Denoiser | CaptionDecoder
    diffusion: GaussianDiffusion
    train_image_hashes: torch.Tensor | None = None  # (N,) image_key_hashes of the training images
    memory: RetrievalMemory | None = None  # the text slot's training-image memory (model.text_slot="retrieved")
    lengths: LengthPredictor | None = None  # caption length from the image (sample.length="predicted")
    matcher: ImageTextMatcher | None = None  # image–text agreement, to choose among samples (sample.select)

    def tensors(self, denoiser_state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """What model.safetensors holds: denoiser weights (default: the live ones), text-space buffers and
        the fingerprints of the training images (for the leakage check of `evaluate`)."""
        state = denoiser_state if denoiser_state is not None else self.denoiser.state_dict()
        out = {**prefixed("denoiser", state), **prefixed("text", self.space.state_dict())}
        if self.train_image_hashes is not None:
            out["data.train_image_hashes"] = self.train_image_hashes
        if self.memory is not None:
            out.update(self.memory.tensors())
        if self.lengths is not None:
            out.update(self.lengths.tensors())
        if self.matcher is not None:
            out.update(self.matcher.tensors())
        return out

    def with_text(self, image: ImageFeatures) -> ImageFeatures:
        """The condition with the text slot filled (retrieved from the memory) when the model has one."""
        if self.config.model.text_slot == "none" or image.text is not None:
            return image
        if self.memory is None:
            raise ValueError("this model has a retrieval text slot but no retrieval memory (a damaged checkpoint?)")
        return image.with_text(self.memory.nearest(image.pooled))

    def trained_on(self, keys: list[str]) -> list[str]:
        """The keys among `keys` that were training images of this model (empty when unknown)."""
        if self.train_image_hashes is None:
            return []
        seen = set(self.train_image_hashes.tolist())
        return [k for k in keys if key_hash(k) in seen]

    @property
    def autoregressive(self) -> bool:
        return self.config.model.kind == "autoregressive"

    @property
    def word_table(self) -> torch.Tensor | None:
        """The learned word table (text.embeddings "trainable"/"learned"), None for the frozen one."""
        return getattr(self.denoiser, "words", None)

    def meta(self) -> dict[str, Any]:
        key = "decoder_shape" if self.autoregressive else "denoiser_shape"
        return {key: dataclasses.asdict(self.denoiser.shape), "text": self.space.describe()}


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
    learned = config.text.embeddings == "learned"
    return DenoiserShape(
        latent_dim=config.text.embedding_dim if learned else space.dim, pooled_dim=pooled_dim, grid_dim=grid_dim,
        hidden=hidden, heads=heads,
        intermediate=intermediate, layers=m.layers, max_length=config.text.max_length, use_pooled=m.use_pooled,
        grid_pool=m.grid_pool, timestep_embedding=m.timestep_embedding, self_condition=m.self_condition,
        dropout=m.dropout, layer_norm_eps=getattr(bc, "layer_norm_eps", 1e-12), grid_mode=m.grid_mode,
        pooled_mode=m.pooled_mode, vocab_size=0 if config.text.embeddings == "frozen" else space.vocab_size,
        text_dim=hidden if m.text_slot == "retrieved" else 0,  # sentence vectors of the same backbone
        pre_norm=m.norm == "pre",
    )


def make_diffusion(config: Config) -> GaussianDiffusion:
    d = config.diffusion
    return GaussianDiffusion.from_schedule(d.schedule, d.timesteps, target=d.target, interval=d.target_interval)


def decoder_shape(config: Config, space: TextSpace, pooled_dim: int, grid_dim: int) -> DecoderShape:
    s = denoiser_shape(config, space, pooled_dim, grid_dim)
    if s.latent_dim != s.hidden:
        raise ConfigError(f"the autoregressive decoder ties its output to the word embeddings, whose width "
                          f"{s.latent_dim} must equal the backbone's hidden size {s.hidden}")
    return DecoderShape(vocab_size=space.vocab_size, hidden=s.hidden, heads=s.heads, intermediate=s.intermediate,
                        layers=s.layers, max_length=s.max_length, pooled_dim=pooled_dim, grid_dim=grid_dim,
                        grid_pool=s.grid_pool, dropout=s.dropout, layer_norm_eps=s.layer_norm_eps,
                        pre_norm=s.pre_norm)


def build_model(config: Config, pooled_dim: int, grid_dim: int, captions: Iterable[str] | None = None) -> CaptionModel:
    """A fresh model; `captions` (training captions) define the rounding vocabulary when restricted."""
    t = config.text
    space = TextSpace.from_backbone(t.backbone, t.max_length, t.latent_scale, captions=captions,
                                    restrict_vocab=t.restrict_vocab)
    _, backbone = load_backbone(t.backbone)
    denoiser: Denoiser | CaptionDecoder
    if config.model.kind == "autoregressive":
        denoiser = CaptionDecoder(decoder_shape(config, space, pooled_dim, grid_dim))
        words = backbone.get_input_embeddings().weight.detach()[space.vocab_ids]
        denoiser.load_backbone(backbone.state_dict(), words, layers=config.model.init_from_backbone)
    else:
        denoiser = Denoiser(denoiser_shape(config, space, pooled_dim, grid_dim))
        denoiser.load_backbone(backbone.state_dict(), space.mean, space.std, t.latent_scale,
                               layers=config.model.init_from_backbone)
        if denoiser.words is not None:
            with torch.no_grad():  # trainable: from the frozen table; learned: N(0, latent_scale^2) per dimension
                denoiser.words.copy_(space.table if t.embeddings == "trainable"
                                     else torch.randn(denoiser.words.shape) * t.latent_scale)
    diffusion = make_diffusion(config)
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
        denoiser: Denoiser | CaptionDecoder
        if config.model.kind == "autoregressive":
            denoiser = CaptionDecoder(DecoderShape(**meta["decoder_shape"]))
        else:
            denoiser = Denoiser(DenoiserShape(**meta["denoiser_shape"]))
        denoiser.load_state_dict(unprefixed("denoiser", tensors))
    except (KeyError, TypeError, RuntimeError) as exc:
        raise CheckpointError(f"{directory}: weights do not match the stored model shape ({exc})") from exc
    denoiser.eval()
    diffusion = make_diffusion(config)
    memory = RetrievalMemory.from_tensors(tensors)
    if config.model.text_slot == "retrieved" and memory is None:
        raise CheckpointError(f"{directory}: the model has a retrieval text slot but the checkpoint holds no memory")
    try:
        lengths = LengthPredictor.from_tensors(tensors)
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"{directory}: its length predictor is damaged ({exc})") from exc
    try:
        matcher = ImageTextMatcher.from_tensors(tensors)
    except (KeyError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{directory}: its image–text matcher is damaged ({exc})") from exc
    return CaptionModel(config, space, denoiser, diffusion, tensors.get("data.train_image_hashes"), memory,
                        lengths, matcher), meta


def load_reranker(directory: Path, model: CaptionModel, model_meta: dict[str, Any] | None = None) -> CaptionModel:
    """The autoregressive model at `directory`, checked to read the same image features as `model` (whose
    checkpoint meta is `model_meta`), for choosing among `model`'s samples (`generate(reranker=...)`)."""
    reranker, meta = load_model(directory)
    theirs, ours = meta.get("encoder"), (model_meta or {}).get("encoder")  # identities, where recorded
    same = reranker.config.encoder.name == model.config.encoder.name and (None in (theirs, ours) or theirs == ours)
    if not reranker.autoregressive or not same:
        raise ValueError(f"--rerank {directory}: needs an autoregressive model on the same image features "
                         f"({model.config.encoder.name})")
    return reranker


def training_losses(model: CaptionModel, network: torch.nn.Module, ids: torch.Tensor, image: ImageFeatures,
                    keep: torch.Tensor, self_condition: bool,
                    rounding_weight: float | None = None) -> dict[str, torch.Tensor]:
    """Every loss term of one batch (and their weighted sum, "loss"), for either kind of model.

    `network` is the (possibly distributed-wrapped) trainable copy of `model.denoiser`; `keep` drops the image
    of some rows (classifier-free guidance, diffusion only); `self_condition` runs the self-conditioning pass;
    `rounding_weight` overrides the config's (the dynamic weight).
    """
    if model.autoregressive:
        return decoder_losses(network(ids, image), ids, model.space, model.config.loss.label_smoothing)
    lc, k = model.config.loss, model.config.train.samples_per_caption
    if k > 1:  # k noise levels per caption: repeat the batch
        ids, image, keep = ids.repeat(k, 1), image.repeat(k), keep.repeat(k)
    table = model.word_table  # the live network's (trained with it), or None for the frozen one
    x0 = model.space.embed(ids, table)  # (B, L, D)
    t = model.diffusion.sample_timesteps(len(ids), device=ids.device)
    fn = lambda x, tt, sc: network(x, tt, image, keep, sc)  # noqa: E731
    pred = model.diffusion.training_prediction(fn, x0, t, torch.randn_like(x0), self_condition)
    pred_1 = None
    if lc.x_1_weight > 0 or lc.rounding_on != "x_t":  # the least noisy level, t = 0 (x_1 in 1-based terms)
        pred_1 = model.diffusion.training_prediction(fn, x0, torch.zeros_like(t), torch.randn_like(x0), False)
    return caption_losses(pred, ids, model.space, lc, pred_1=pred_1, latent_target=model.diffusion.target != "eps",
                          rounding_weight=rounding_weight, table=table)


def self_critical_losses(model: CaptionModel, network: torch.nn.Module, image: ImageFeatures, images: torch.Tensor,
                         reward: CiderD) -> dict[str, torch.Tensor]:
    """One self-critical step's loss (loss.objective="cider", autoregressive models): `loss.cider_samples`
    captions sampled per image of the batch at `loss.cider_temperature`, each rewarded with its CIDEr-D against
    that image's training references (`images` (B,): the images' indices in `reward`), then
    `losses.self_critical_loss`."""
    if not model.autoregressive:
        raise ValueError("self-critical training needs an autoregressive model (model.kind=autoregressive)")
    lc, sp = model.config.loss, model.space
    k = lc.cider_samples
    image = image.repeat(k)  # sample j of image b in row j*B + b
    decoder = model.denoiser
    assert isinstance(decoder, CaptionDecoder)
    end = (sp.sep_index, sp.pad_index)
    was_training = decoder.training
    decoder.eval()  # draw from the model itself, without dropout
    try:
        tokens = decoder.generate(image, end=end, banned=(sp.unk_index,), sample=True,
                                  temperature=lc.cider_temperature)
    finally:
        decoder.train(was_training)
    captions = sp.decode(tokens, model.config.sample.collapse_repeats)
    rewards = torch.tensor(reward.scores(captions, images.repeat(k).tolist()), device=tokens.device)
    return self_critical_loss(network(tokens, image), tokens, rewards, k, end, lc.cider_temperature)


@torch.no_grad()
def caption_log_likelihood(model: CaptionModel, image: ImageFeatures, captions: Sequence[str]) -> torch.Tensor:
    """(B,) mean log-probability per word piece (its [SEP] included) of caption i given image i, under an
    autoregressive model; an empty caption scores -inf. Words outside its vocabulary count as [UNK]."""
    if not model.autoregressive:
        raise ValueError("captions are scored by an autoregressive model (model.kind=autoregressive)")
    if len(captions) != len(image):
        raise ValueError(f"{len(captions)} captions for {len(image)} images")
    empty = torch.tensor([not c.strip() for c in captions])
    ids = model.space.encode([c if c.strip() else "." for c in captions])
    decoder = model.denoiser
    decoder.eval()
    device = next(decoder.parameters()).device
    ids = ids.to(device)
    logp = decoder(ids, image.to(device)).float().log_softmax(-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    counted = (ids != model.space.pad_index).float()  # the pieces and [SEP]
    scores = (logp * counted).sum(-1) / counted.sum(-1)
    return scores.cpu().masked_fill(empty, -float("inf"))


def fit_length_predictor(space: TextSpace, pooled: torch.Tensor, captions: Sequence[Sequence[str]]) -> LengthPredictor:
    """P(caption length | image) from the training images' pooled features (M, Dp) and their captions (M lists),
    measured in this text space's word pieces (models/length.py)."""
    owners = torch.tensor([i for i, cs in enumerate(captions) for _ in cs], dtype=torch.long)
    ids = space.encode([c for cs in captions for c in cs])
    return LengthPredictor.fit(pooled, caption_lengths(ids, space.sep_index), owners, space.max_length)


def fit_caption_matcher(model: CaptionModel, pooled: torch.Tensor, captions: Sequence[Sequence[str]], *,
                        progress: bool = False) -> ImageTextMatcher:
    """An image–text matcher (models/matching.py) from the training images' pooled features (M, Dp) and their
    captions (M lists), on the sentence vectors of the model's own text backbone."""
    owners = torch.tensor([i for i, cs in enumerate(captions) for _ in cs], dtype=torch.long)
    vectors = sentence_vectors(model.config.text.backbone, [c for cs in captions for c in cs], progress=progress)
    return fit_matcher(pooled, vectors, owners, progress=progress)


def matcher_scores(model: CaptionModel, image: ImageFeatures, captions: Sequence[str]) -> torch.Tensor:
    """(B,) cosine agreement of caption b with image b by the checkpoint's matcher (higher is better)."""
    if model.matcher is None:
        raise ValueError("this checkpoint has no image–text matcher: add one with `diffcap fit-matcher`")
    vectors = sentence_vectors(model.config.text.backbone, list(captions))
    with torch.no_grad():
        return model.matcher.similarity(image.pooled.float().cpu(), vectors)


def row_noise(shape: Sequence[int], seeds: Sequence[int]) -> torch.Tensor:
    """(len(seeds), *shape) standard normal noise, row i from its own generator seeded by seeds[i]."""
    return torch.stack([torch.randn(tuple(shape), generator=torch.Generator().manual_seed(s)) for s in seeds])


# the noise levels, as fractions of the diffusion's T, at which `denoising_cross_entropy` reconstructs a caption
SELF_SCORE_LEVELS = (0.1, 0.3, 0.5, 0.8)
SELF_SCORE_SALT = 1 << 40  # its noise seeds sit far from the sampling seeds (seed * 1_000_003 + index)


def denoising_cross_entropy(model: CaptionModel, image: ImageFeatures, captions: Sequence[str],
                            rows: Sequence[int], seed: int = 0) -> torch.Tensor:
    """(B,) the diffusion model's own reading of how unlikely caption b is for image b (lower is better).

    Caption b is embedded, noised to each of SELF_SCORE_LEVELS (fixed noise seeded by `seed` and `rows[b]`, so
    the candidates of one image meet the same noise), and the model estimates it back as in training (with its
    self-conditioning pass); the score is the mean cross-entropy per position of the caption's word pieces under
    the rounding logits of those estimates, averaged over the levels: a per-sample denoising loss. An empty
    caption scores +inf.
    """
    if model.autoregressive:
        raise ValueError("denoising_cross_entropy scores captions with a diffusion model")
    if not len(captions) == len(rows) == len(image):
        raise ValueError(f"{len(captions)} captions, {len(rows)} rows and {len(image)} images: one each")
    device = next(model.denoiser.parameters()).device
    empty = torch.tensor([not c.strip() for c in captions])
    ids = model.space.encode([c if c.strip() else "." for c in captions]).to(device)
    x0 = model.space.embed(ids, model.word_table)
    noise = row_noise(x0.shape[1:], [SELF_SCORE_SALT + seed * 1_000_003 + r for r in rows]).to(device)
    network = conditioned(model.denoiser, model.with_text(image), 0.0)
    T, total = model.diffusion.num_timesteps, torch.zeros(len(captions), device=device)
    with torch.no_grad():
        for level in SELF_SCORE_LEVELS:
            t = torch.full((len(captions),), min(T - 1, round(level * T)), device=device)
            pred = model.diffusion.training_prediction(network, x0, t, noise, model.denoiser.shape.self_condition)
            log_probs = model.space.logits(pred.x0_hat, model.word_table).float().log_softmax(-1)
            total -= log_probs.gather(-1, ids.unsqueeze(-1)).squeeze(-1).mean(1)
    return (total / len(SELF_SCORE_LEVELS)).cpu().masked_fill(empty, float("inf"))


def add_length_predictor(directory: Path, predictor: LengthPredictor) -> Path:
    """Store `predictor` in an existing checkpoint (replacing any it had), rewritten atomically; its weights and
    training state are kept as they are, so a run resumes from it exactly as before."""
    return add_tensors(directory, "length.", predictor.tensors())


def add_matcher(directory: Path, matcher: ImageTextMatcher) -> Path:
    """Store `matcher` in an existing checkpoint (replacing any it had), like `add_length_predictor`."""
    return add_tensors(directory, "matcher.", matcher.tensors())


def add_tensors(directory: Path, prefix: str, new: dict[str, torch.Tensor]) -> Path:
    """Replace a checkpoint's tensors under `prefix` by `new`, rewritten atomically with everything else kept."""
    directory = Path(directory)
    config, meta, tensors = load_checkpoint(directory)
    train_meta, train_tensors = load_train_state(directory) if (directory / "train_state.json").exists() \
        else (None, None)
    tensors = {k: v for k, v in tensors.items() if not k.startswith(prefix)} | new
    return save_checkpoint(directory, config_json=json.dumps(config, indent=2, sort_keys=True),
                           meta={k: v for k, v in meta.items() if k != "format_version"}, tensors=tensors,
                           train_tensors=train_tensors, train_meta=train_meta)


def export_model(source: Path, destination: Path, *, half: bool = True, sample: Sequence[str] = ()) -> Path:
    """A captioning-only copy of a checkpoint: no optimizer or training state, network weights in fp16 when
    `half` (text-space statistics and vocabulary stay exact). It loads with `load_model` like any other.
    `sample` holds `sample.field=value` overrides: the sampling defaults the copy captions with (how the shipped
    checkpoint chooses among several samples, for instance); nothing else can change, since the weights fix it."""
    config, meta, tensors = load_checkpoint(Path(source))
    if sample:
        config = with_sample_defaults(config, sample, has_matcher=any(k.startswith("matcher.") for k in tensors))
    out = {k: v.half() if half and k.startswith(("denoiser.", "matcher.")) and v.is_floating_point() else v
           for k, v in tensors.items()}
    meta = {k: v for k, v in meta.items() if k != "format_version"}
    # a copy of a copy still names the checkpoint that training wrote
    meta.update(exported_from=meta.get("exported_from", str(source)), weights_dtype="float16" if half else "float32")
    return save_checkpoint(Path(destination), config_json=json.dumps(config, indent=2, sort_keys=True), meta=meta,
                           tensors=out)


def with_sample_defaults(config: dict[str, Any], overrides: Sequence[str], *, has_matcher: bool) -> dict[str, Any]:
    """A checkpoint's config dict with `sample.field=value` overrides applied and checked (ConfigError)."""
    for item in overrides:
        if not item.strip().startswith("sample."):
            raise ConfigError(f"{item!r}: only sampling defaults (sample.field=value) can change in a copy; "
                              "the rest is fixed by the trained weights")
    updated = Config.from_dict(config)
    apply_overrides(updated, list(overrides))
    validate(updated)
    if updated.sample.candidates > 1 and updated.sample.select == "match" and not has_matcher:
        raise ConfigError("sample.select=match: this checkpoint has no image–text matcher; add one with "
                          "`diffcap fit-matcher` before exporting")
    return updated.to_dict()


@dataclass
class Generation:
    captions: list[str]
    # per step: (t, rounded captions, per-position confidence (B, L), per-position word-piece index (B, L))
    # when a trajectory was asked for
    trajectory: list[tuple[int, list[str], torch.Tensor, torch.Tensor]]
    # with candidates = N > 1: every image's N sampled captions (candidate k from seed + k), else empty
    candidates: list[list[str]] = field(default_factory=list)


def choice_settings(model: CaptionModel, select: str | None, match_weight: float | None,
                    self_weight: float | None) -> tuple[str, float, float]:
    """select, match_weight and self_weight, each the checkpoint's `sample` value where None, checked."""
    s = model.config.sample
    select = s.select if select is None else select
    match_weight = s.match_weight if match_weight is None else match_weight
    self_weight = s.self_weight if self_weight is None else self_weight
    if select not in ("mbr", "match"):
        raise ValueError(f"select must be mbr or match, got {select!r}")
    if match_weight < 0:
        raise ValueError(f"match_weight must be >= 0, got {match_weight}")
    if self_weight < 0:
        raise ValueError(f"self_weight must be >= 0, got {self_weight}")
    return select, match_weight, self_weight


@torch.no_grad()
def choose_candidates(model: CaptionModel, image: ImageFeatures, candidates: Sequence[Sequence[str]], *,
                      rows: Sequence[int], seed: int, reranker: CaptionModel | None = None, select: str | None = None,
                      match_weight: float | None = None, self_weight: float | None = None) -> list[int]:
    """Which of its N candidates each image keeps: `candidates[i][k]` is candidate k of image i (N the same for
    every image). With a reranker, the most likely one (mean log-probability per word piece, plus `match_weight` x
    the matcher's agreement); else by `select`: "mbr" the minimum-Bayes-risk one, "match" the matcher's choice.
    The matcher's agreement is its cosine less `self_weight` x the model's own `denoising_cross_entropy`, whose
    noise comes from `seed` and each image's `rows` entry (its index in the caller's list). A setting left None
    is the checkpoint's."""
    select, match_weight, self_weight = choice_settings(model, select, match_weight, self_weight)
    n = len(candidates[0]) if candidates else 0
    if any(len(row) != n for row in candidates) or len(candidates) != len(image) or len(rows) != len(image):
        raise ValueError("choose_candidates: one row of N candidates and one row index per image")
    if n == 1:
        return [0] * len(candidates)
    if reranker is None and select == "mbr":
        return [mbr_select(row) for row in candidates]
    flat = [row[k] for k in range(n) for row in candidates]  # candidate k of image i is flat[k * B + i]
    repeated = image.repeat(n)

    def agreement() -> torch.Tensor:  # the matcher's cosine, less self_weight x the model's own loss
        cosine = matcher_scores(model, repeated, flat)
        if self_weight == 0:
            return cosine
        return cosine - self_weight * denoising_cross_entropy(model, repeated, flat, list(rows) * n, seed)

    if reranker is None:
        scores = agreement()
    else:
        scores = caption_log_likelihood(reranker, repeated, flat)
        if match_weight > 0:
            scores = scores + match_weight * agreement()
    return scores.view(n, -1).argmax(0).tolist()


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
    indices: Sequence[int] | None = None,
    keep_trajectory: bool = False,
    beam_size: int | None = None,
    candidates: int | None = None,
    precision: str | None = None,
    solver: str | None = None,
    spacing: str | None = None,
    length: str | None = None,
    reranker: CaptionModel | None = None,
    select: str | None = None,
    match_weight: float | None = None,
    self_weight: float | None = None,
) -> Generation:
    """Captions for a batch of image features (or `batch` unconditional ones when image is None).

    With `candidates` = N > 1 each image is captioned N times from independent noise (candidate k from seed
    `seed + k`, so candidate 0 is the single-sample caption) and one is kept: by `select` "mbr" the
    minimum-Bayes-risk choice, by "match" the one the checkpoint's image–text matcher prefers.
    Row i starts from the noise of index `indices[i]` (default `first_index + i`; see below).
    `length="predicted"` fixes each caption's length from its image (the checkpoint's length predictor).
    `reranker`: an autoregressive model on the same image features; with candidates > 1 the candidate it finds
    most likely (mean log-probability per word piece, plus `match_weight` x the matcher's cosine) is returned.
    `self_weight` > 0 subtracts that weight x the model's own `denoising_cross_entropy` of each candidate from the
    matcher's cosine, wherever the cosine counts (select="match", or a reranker with match_weight > 0).
    """
    s = model.config.sample
    steps = s.steps if steps is None else steps
    guidance = s.guidance if guidance is None else guidance
    clamp = s.clamp if clamp is None else clamp
    if steps < 1 or steps > model.diffusion.num_timesteps:
        raise ValueError(f"steps must be between 1 and {model.diffusion.num_timesteps}, got {steps}")
    if guidance < 0:
        raise ValueError(f"guidance must be >= 0, got {guidance}")
    penalty = s.end_penalty if end_penalty is None else end_penalty
    collapse = s.collapse_repeats if collapse_repeats is None else collapse_repeats
    precision = s.precision if precision is None else precision
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be fp32 or bf16, got {precision!r}")
    length = s.length if length is None else length
    if length not in ("free", "predicted"):
        raise ValueError(f"length must be free or predicted, got {length!r}")
    device = next(model.denoiser.parameters()).device
    # bf16 autocast runs the network's matmuls in bf16 (about 2.4x the fp32 rate on recent CPUs); the
    # sampler's arithmetic and the rounding stay in fp32
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    if model.autoregressive:
        if image is None:
            raise ValueError("the autoregressive baseline has no unconditional mode: it needs an image")
        if keep_trajectory:
            raise ValueError("an autoregressive model has no denoising trajectory")
        decoder = model.denoiser
        assert isinstance(decoder, CaptionDecoder)
        decoder.eval()
        sp = model.space
        with autocast:
            ids = decoder.generate(image, end=(sp.sep_index, sp.pad_index), banned=(sp.unk_index,),
                                   beam_size=s.beam_size if beam_size is None else beam_size)
        return Generation(sp.decode(ids, collapse), [])
    n = s.candidates if candidates is None else candidates
    if n < 1:
        raise ValueError(f"candidates must be >= 1, got {n}")
    select, match_weight, self_weight = choice_settings(model, select, match_weight, self_weight)
    if n > 1 and image is not None and model.matcher is None and (
            (select == "match" and reranker is None) or (match_weight > 0 and reranker is not None)):
        raise ValueError("this checkpoint has no image–text matcher: add one with `diffcap fit-matcher`, "
                         "or choose by select=mbr")
    if n > 1:
        if keep_trajectory:
            raise ValueError("a trajectory follows one sample: ask for it with candidates=1")
        base = s.seed if seed is None else seed
        options = dict(batch=batch, steps=steps, guidance=guidance, clamp=clamp, eta=eta, time_difference=time_difference,
                       collapse_repeats=collapse_repeats, end_penalty=end_penalty, first_index=first_index,
                       indices=indices, precision=precision, solver=solver, spacing=spacing, length=length)
        per_seed = [generate(model, image, seed=base + k, candidates=1, **options).captions for k in range(n)]
        per_image = [list(row) for row in zip(*per_seed)]
        if image is None:
            return Generation([row[mbr_select(row)] for row in per_image], [], per_image)
        rows = list(indices) if indices is not None else [first_index + i for i in range(len(image))]
        best = choose_candidates(model, image, per_image, rows=rows, seed=base, reranker=reranker, select=select,
                                 match_weight=match_weight, self_weight=self_weight)
        return Generation([row[k] for row, k in zip(per_image, best)], [], per_image)
    B = len(image) if image is not None else (batch or 1)
    base = s.seed if seed is None else seed
    generator = torch.Generator(device="cpu").manual_seed(base)  # fresh noise of eta > 0 steps
    shape = (B, model.space.max_length, model.denoiser.shape.latent_dim)
    table = model.word_table
    # Row i starts from noise seeded by (seed, first_index + i): the k-th image of a call gets the same caption
    # whatever the batch size, and different images get independent noise (a corpus score then averages
    # over many draws instead of resting on one).
    if indices is not None and len(indices) != B:
        raise ValueError(f"indices: {len(indices)} given for {B} rows")
    rows = list(indices) if indices is not None else [first_index + i for i in range(B)]
    noise = row_noise(shape[1:], [base * 1_000_003 + index for index in rows])
    model.denoiser.eval()
    lengths = None
    if length == "predicted":
        if model.lengths is None:
            raise ValueError("this checkpoint has no length predictor (trained before it existed): "
                             "sample with length=free (--length free)")
        if image is None:
            raise ValueError("a predicted length needs an image: unconditional sampling uses length=free")
        lengths = model.lengths.predict(image.pooled)
    if image is not None:
        image = model.with_text(image)
    network = conditioned(model.denoiser, image, guidance)

    def denoise(x: torch.Tensor, t: torch.Tensor, sc: torch.Tensor | None) -> torch.Tensor:
        with autocast:
            return network(x, t, sc).float()

    result = model.diffusion.sample(
        denoise,
        shape,
        steps,
        denoised_fn=(lambda x0: model.space.clamp(x0, penalty, table, lengths)) if clamp
        else (lambda x0: model.space.fix_length(x0, lengths, table)) if lengths is not None else None,
        self_condition=model.denoiser.shape.self_condition,
        eta=s.eta if eta is None else eta,
        time_difference=s.time_difference if time_difference is None else time_difference,
        generator=generator,
        device=device,
        keep_trajectory=keep_trajectory,
        noise=noise,
        solver=s.solver if solver is None else solver,
        spacing=s.spacing if spacing is None else spacing,
    )
    ids = model.space.round(result.x0, penalty, table, lengths)
    trajectory = []
    for t, x0_hat in result.trajectory:
        probs = model.space.logits(x0_hat, table).softmax(-1)
        confidence, step_ids = probs.max(-1)
        trajectory.append((t, model.space.decode(step_ids, collapse), confidence, step_ids))
    return Generation(model.space.decode(ids, collapse), trajectory)
