"""The denoiser: a BERT-style transformer that predicts clean caption latents x0 from noisy ones.

Input sequence (no attention mask — every position is always visible, in training as at sampling):

    [ image prefix: pooled vector, P x P pooled grid cells, (text slot) ] [ caption latents x_t (and self-cond x0_hat) ]
      type embedding 1, learned prefix positions                          type embedding 0, backbone positions

With `grid_mode="cross"` the grid cells leave the sequence and become a memory every block cross-attends to
(a BERT decoder layer: self-attention, cross-attention, feed-forward): the sequence is then only the pooled
vector and the caption, so the full 7 x 7 grid costs about what a 3 x 3 prefix does.

plus a sinusoidal timestep embedding (through an MLP) added at every position. The output at the caption
positions is the predicted x0. The blocks are initialised from the pretrained backbone's first layers.
The network knows no noise schedule: it maps (x_t, t, image, self_cond) -> x0_hat and nothing more.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from diffcap.models.ops import attention, dropout


@dataclass(frozen=True)
class ImageFeatures:
    """The condition: an image's features, and the text slot's feature for models that have one."""

    pooled: torch.Tensor  # (B, Dp)
    grid: torch.Tensor  # (B, N, Dg), N = side * side
    text: torch.Tensor | None = None  # (B, Dt) the text slot's feature (model.text_slot), else None

    def __len__(self) -> int:
        return int(self.pooled.shape[0])

    def to(self, device: torch.device | str) -> ImageFeatures:
        return ImageFeatures(self.pooled.to(device), self.grid.to(device),
                             None if self.text is None else self.text.to(device))

    def repeat(self, n: int) -> ImageFeatures:
        return ImageFeatures(self.pooled.repeat(n, 1), self.grid.repeat(n, 1, 1),
                             None if self.text is None else self.text.repeat(n, 1))

    def with_text(self, text: torch.Tensor) -> ImageFeatures:
        return ImageFeatures(self.pooled, self.grid, text)


@dataclass(frozen=True)
class DenoiserShape:
    """Every dimension the network needs; derived from the config, the backbone and the encoder."""

    latent_dim: int
    pooled_dim: int
    grid_dim: int
    hidden: int
    heads: int
    intermediate: int
    layers: int
    max_length: int
    use_pooled: bool
    grid_pool: int
    timestep_embedding: bool
    self_condition: bool
    dropout: float
    layer_norm_eps: float = 1e-12
    grid_mode: str = "prefix"  # "prefix": grid cells are sequence positions; "cross": a cross-attended memory
    pooled_mode: str = "concat"  # "concat": the pooled vector is a prefix position; "add": added to every position
    vocab_size: int = 0  # > 0: the network owns a learned (vocab_size, latent_dim) word table (text.embeddings)
    text_dim: int = 0  # > 0: one more prefix position, the text slot's feature projected (model.text_slot)
    pre_norm: bool = False  # model.norm == "pre": pre-LayerNorm blocks and a final LayerNorm

    @property
    def cross(self) -> bool:
        return self.grid_mode == "cross" and self.grid_pool > 0

    @property
    def added(self) -> bool:
        return self.pooled_mode == "add" and self.use_pooled

    @property
    def prefix_length(self) -> int:
        return int(self.use_pooled and not self.added) + (0 if self.cross else self.grid_pool**2) + int(self.text_dim > 0)

    @property
    def memory_length(self) -> int:
        return self.grid_pool**2 if self.cross else 0


class KVCache:
    """The self-attention keys and values of the positions decoded so far (one per block; autoregressive decoding)."""

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k is not None and self.v is not None:
            k, v = torch.cat([self.k, k], 1), torch.cat([self.v, v], 1)
        self.k, self.v = k, v
        return k, v

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep `rows` (beam search: the beams that survived)."""
        if self.k is not None and self.v is not None:
            self.k, self.v = self.k[rows], self.v[rows]


class Block(nn.Module):
    """One BERT layer (attention, [cross-attention,] feed-forward) with our CPU attention/dropout ops.

    `pre_norm=False` is BERT's post-LayerNorm (x = norm(x + f(x)), the pretrained backbone's layout);
    `pre_norm=True` normalises each sublayer's input instead (x = x + f(norm(x)); GPT-2 / DiT layout, needs a
    final LayerNorm after the last block, which the models own).
    """

    def __init__(self, hidden: int, heads: int, intermediate: int, dropout: float, eps: float,
                 cross: bool = False, pre_norm: bool = False) -> None:
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = (nn.Linear(hidden, hidden) for _ in range(3))
        self.attn_out = nn.Linear(hidden, hidden)
        self.attn_norm = nn.LayerNorm(hidden, eps=eps)
        if cross:  # new weights (the backbone has none); cross_out starts at zero, so the block starts as pretrained
            self.cross_query, self.cross_key, self.cross_value = (nn.Linear(hidden, hidden) for _ in range(3))
            self.cross_out = nn.Linear(hidden, hidden)
            self.cross_norm = nn.LayerNorm(hidden, eps=eps)
        self.cross = cross
        self.ff_in = nn.Linear(hidden, intermediate)
        self.ff_out = nn.Linear(intermediate, hidden)
        self.ff_norm = nn.LayerNorm(hidden, eps=eps)
        self.dropout = dropout
        self.pre_norm = pre_norm

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False) -> torch.Tensor:
        (B, N, H), M = q.shape, k.shape[1]
        q = q.view(B, N, self.heads, H // self.heads).transpose(1, 2)  # (B, heads, N, hd)
        k = k.view(B, M, self.heads, H // self.heads).transpose(1, 2)  # (B, heads, M, hd)
        v = v.view(B, M, self.heads, H // self.heads).transpose(1, 2)
        out = attention(q, k, v, p=self.dropout, causal=causal, training=self.training)
        return out.transpose(1, 2).reshape(B, N, H)

    def _residual(self, x: torch.Tensor, norm: nn.LayerNorm, sublayer: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        if self.pre_norm:
            return x + dropout(sublayer(norm(x)), self.dropout, self.training)
        return norm(x + dropout(sublayer(x), self.dropout, self.training))

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None, causal: bool = False,
                memory_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        """`memory` (B, M, H) is what cross-attention reads; `memory_kv` its keys and values, when precomputed.
        With a `cache` (decoding), x is the one new position: it attends to the cached ones and is appended."""

        def self_attention(h: torch.Tensor) -> torch.Tensor:
            k, v = self.key(h), self.value(h)
            if cache is not None:
                k, v = cache.extend(k, v)
            return self.attn_out(self._attend(self.query(h), k, v, causal and cache is None))

        x = self._residual(x, self.attn_norm, self_attention)
        if self.cross:
            if memory_kv is None:
                assert memory is not None, "a cross-attention block needs the image memory"
                memory_kv = self.cross_key(memory), self.cross_value(memory)
            kv = memory_kv
            x = self._residual(x, self.cross_norm, lambda h: self.cross_out(self._attend(self.cross_query(h), *kv)))
        return self._residual(x, self.ff_norm, lambda h: self.ff_out(F.gelu(self.ff_in(h))))


def bert_init(root: nn.Module) -> None:
    """BERT's initialisation of every Linear and Embedding below `root`: N(0, 0.02) weights, zero biases."""
    for module in root.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding of (B,) timesteps -> (B, dim), as in improved-diffusion."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


@dataclass(frozen=True)
class Condition:
    """What the denoiser derives from the image alone: computed once per image and reused at every sampling
    step (the image never changes between steps, only x_t does)."""

    prefix: torch.Tensor  # (B, P, H) prefix positions, with their position and type embeddings
    added: torch.Tensor | None  # (B, 1, H) the pooled vector added to every position ("add" mode)
    memory_kv: tuple[tuple[torch.Tensor, torch.Tensor], ...] | None  # per block: cross-attention keys, values


class Denoiser(nn.Module):
    def __init__(self, shape: DenoiserShape) -> None:
        super().__init__()
        s = self.shape = shape
        H = s.hidden
        self.in_proj = nn.Linear(s.latent_dim * (2 if s.self_condition else 1), H)
        self.positions = nn.Embedding(s.max_length, H)
        self.types = nn.Embedding(2, H)  # 0 = caption position, 1 = image position
        self.embed_norm = nn.LayerNorm(H, eps=s.layer_norm_eps)
        self.pooled_proj = nn.Linear(s.pooled_dim, H) if s.use_pooled else None
        self.null_pooled = nn.Parameter(torch.zeros(H)) if s.added else None  # "no image" in add mode
        self.grid_proj = nn.Linear(s.grid_dim, H) if s.grid_pool > 0 else None
        self.text_proj = nn.Linear(s.text_dim, H) if s.text_dim > 0 else None
        self.prefix_positions = nn.Parameter(torch.zeros(s.prefix_length, H))
        self.null_prefix = nn.Parameter(torch.zeros(s.prefix_length, H))  # the "no image" condition
        if s.cross:
            self.memory_positions = nn.Parameter(torch.zeros(s.memory_length, H))
            self.null_memory = nn.Parameter(torch.zeros(s.memory_length, H))
            self.memory_norm = nn.LayerNorm(H, eps=s.layer_norm_eps)
        self.time_mlp = (
            nn.Sequential(nn.Linear(H, 4 * H), nn.SiLU(), nn.Linear(4 * H, H)) if s.timestep_embedding else None
        )
        self.blocks = nn.ModuleList(
            Block(H, s.heads, s.intermediate, s.dropout, s.layer_norm_eps, s.cross, s.pre_norm) for _ in range(s.layers)
        )
        self.final_norm = nn.LayerNorm(H, eps=s.layer_norm_eps) if s.pre_norm else None
        self.out_proj = nn.Linear(H, s.latent_dim)
        # the learned word table (trainable or learned embeddings): the text space embeds and rounds with it
        self.words = nn.Parameter(torch.zeros(s.vocab_size, s.latent_dim)) if s.vocab_size > 0 else None
        self._initialize_weights()

    def _initialize_weights(self) -> None:
        bert_init(self)
        nn.init.normal_(self.prefix_positions, std=0.02)
        nn.init.normal_(self.null_prefix, std=0.02)
        if self.null_pooled is not None:
            nn.init.normal_(self.null_pooled, std=0.02)
        if self.shape.cross:
            nn.init.normal_(self.memory_positions, std=0.02)
            nn.init.normal_(self.null_memory, std=0.02)
            for block in self.blocks:
                nn.init.zeros_(block.cross_out.weight)
        if self.time_mlp is not None:  # start as "no timestep information", learn to use it
            nn.init.zeros_(self.time_mlp[-1].weight)

    # -- inputs ------------------------------------------------------------------------------------------
    def _pooled_grid(self, image: ImageFeatures) -> torch.Tensor:
        """(B, P*P, H): the feature grid average-pooled to grid_pool x grid_pool cells and projected."""
        B, N, Dg = image.grid.shape
        side = math.isqrt(N)
        grid = image.grid.transpose(1, 2).reshape(B, Dg, side, side)  # (B, Dg, side, side)
        grid = F.adaptive_avg_pool2d(grid, self.shape.grid_pool).flatten(2).transpose(1, 2)  # (B, P*P, Dg)
        return self.grid_proj(grid)

    @staticmethod
    def _drop(cond: torch.Tensor, null: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """Rows with keep=False get the learned null condition instead of the image."""
        return cond if keep is None else torch.where(keep.view(-1, 1, 1), cond, null.to(cond.dtype))

    def image_prefix(self, image: ImageFeatures | None, keep: torch.Tensor | None, batch: int) -> torch.Tensor:
        """(B, P, H) projected image positions; rows with keep=False (or no image) get the null condition."""
        null = self.null_prefix.unsqueeze(0).expand(batch, -1, -1)
        if image is None or self.shape.prefix_length == 0:
            return null
        parts = []
        if self.pooled_proj is not None and not self.shape.added:
            parts.append(self.pooled_proj(image.pooled).unsqueeze(1))  # (B, 1, H)
        if self.grid_proj is not None and not self.shape.cross:
            parts.append(self._pooled_grid(image))
        if self.text_proj is not None:
            if image.text is None:
                raise ValueError("this model has a text slot (model.text_slot): the condition needs its text feature")
            parts.append(self.text_proj(image.text).unsqueeze(1))  # (B, 1, H)
        return self._drop(torch.cat(parts, dim=1), null, keep)  # (B, P, H)

    def image_added(self, image: ImageFeatures | None, keep: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        """(B, 1, H) the projected pooled vector added to every position ("add" mode; None otherwise)."""
        if not self.shape.added:
            return None
        assert self.null_pooled is not None and self.pooled_proj is not None
        null = self.null_pooled.view(1, 1, -1).expand(batch, 1, -1)
        if image is None:
            return null
        return self._drop(self.pooled_proj(image.pooled).unsqueeze(1), null, keep)

    def image_memory(self, image: ImageFeatures | None, keep: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        """(B, M, H) the grid memory of cross-attention blocks (None in prefix mode)."""
        if not self.shape.cross:
            return None
        null = self.null_memory.unsqueeze(0).expand(batch, -1, -1)
        memory = null if image is None else self._drop(self._pooled_grid(image), null, keep)
        return self.memory_norm(memory + self.memory_positions)

    def condition(self, image: ImageFeatures | None, keep: torch.Tensor | None, batch: int) -> Condition:
        """Everything that depends on the image only (rows with keep=False get the learned null condition)."""
        prefix = self.image_prefix(image, keep, batch) + self.prefix_positions + self.types.weight[1]
        memory = self.image_memory(image, keep, batch)  # (B, M, H) or None
        kv = None if memory is None else tuple((b.cross_key(memory), b.cross_value(memory)) for b in self.blocks)
        return Condition(prefix, self.image_added(image, keep, batch), kv)

    def forward(
        self,
        x_t: torch.Tensor,  # (B, L, D)
        t: torch.Tensor,  # (B,)
        image: ImageFeatures | None = None,
        keep: torch.Tensor | None = None,  # (B,) bool: False drops the image (classifier-free guidance)
        self_cond: torch.Tensor | None = None,  # (B, L, D) previous x0 estimate, or None
        cond: Condition | None = None,  # precomputed `condition(image, keep, B)`: then image/keep are not read
    ) -> torch.Tensor:
        B, L, _ = x_t.shape
        if cond is None:
            cond = self.condition(image, keep, B)
        if self.shape.self_condition:
            x_t = torch.cat([x_t, self_cond if self_cond is not None else torch.zeros_like(x_t)], dim=-1)
        text = self.in_proj(x_t) + self.positions.weight[:L] + self.types.weight[0]  # (B, L, H)
        h = torch.cat([cond.prefix.to(text.dtype), text], dim=1)  # (B, P + L, H)
        if self.time_mlp is not None:
            h = h + self.time_mlp(timestep_embedding(t, self.shape.hidden)).unsqueeze(1)
        if cond.added is not None:
            h = h + cond.added
        h = dropout(self.embed_norm(h), self.shape.dropout, self.training)
        for i, block in enumerate(self.blocks):
            h = block(h, memory_kv=None if cond.memory_kv is None else cond.memory_kv[i])
        if self.final_norm is not None:
            h = self.final_norm(h)
        return self.out_proj(h[:, -L:])  # (B, L, D)

    # -- initialisation from a pretrained backbone ------------------------------------------------------
    def load_backbone(self, state: dict[str, torch.Tensor], latent_mean: torch.Tensor | None = None,
                      latent_std: torch.Tensor | None = None, latent_scale: float = 1.0, layers: bool = True) -> None:
        """Copy the backbone's positions and embedding LayerNorm and, with `layers`, its first layers (BERT or
        DistilBERT names).

        When the latent and hidden widths agree, `in_proj` starts as the inverse of the latent
        standardisation, so at t = 0 the pretrained layers see the word embeddings they were trained on.
        """
        mapping = backbone_key_map(state, len(self.blocks))
        own = self.state_dict()
        loaded = {}
        for mine, theirs in mapping.items():
            if mine.startswith("blocks.") and not layers:
                continue
            value = state[theirs]
            if mine == "positions.weight":
                value = value[: self.shape.max_length]
            if mine == "types.weight" and value.shape[0] < 2:
                value = value.repeat(2, 1)
            if own[mine].shape != value.shape:
                raise ValueError(f"backbone weight {theirs} has shape {tuple(value.shape)}, expected {tuple(own[mine].shape)}")
            loaded[mine] = value
        self.load_state_dict(loaded, strict=False)
        if latent_std is not None and latent_mean is not None and self.shape.latent_dim == self.shape.hidden:
            with torch.no_grad():
                D = self.shape.latent_dim
                self.in_proj.weight.zero_()
                self.in_proj.weight[:, :D] = torch.diag(latent_std / latent_scale)
                self.in_proj.bias.copy_(latent_mean)


def backbone_key_map(state: dict[str, torch.Tensor], layers: int) -> dict[str, str]:
    """Our parameter names -> the backbone's, for BertModel and DistilBertModel state dicts."""
    if any(k.startswith("encoder.layer.") for k in state):  # BERT / MiniLM
        names = {
            "query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
            "attn_out": "attention.output.dense", "attn_norm": "attention.output.LayerNorm",
            "ff_in": "intermediate.dense", "ff_out": "output.dense", "ff_norm": "output.LayerNorm",
        }
        prefix, available = "encoder.layer", {int(k.split(".")[2]) for k in state if k.startswith("encoder.layer.")}
        top = {"positions.weight": "embeddings.position_embeddings.weight",
               "types.weight": "embeddings.token_type_embeddings.weight",
               "embed_norm.weight": "embeddings.LayerNorm.weight", "embed_norm.bias": "embeddings.LayerNorm.bias"}
    elif any(k.startswith("transformer.layer.") for k in state):  # DistilBERT
        names = {
            "query": "attention.q_lin", "key": "attention.k_lin", "value": "attention.v_lin",
            "attn_out": "attention.out_lin", "attn_norm": "sa_layer_norm",
            "ff_in": "ffn.lin1", "ff_out": "ffn.lin2", "ff_norm": "output_layer_norm",
        }
        prefix, available = "transformer.layer", {int(k.split(".")[2]) for k in state if k.startswith("transformer.layer.")}
        top = {"positions.weight": "embeddings.position_embeddings.weight",
               "embed_norm.weight": "embeddings.LayerNorm.weight", "embed_norm.bias": "embeddings.LayerNorm.bias"}
    else:
        raise ValueError("unrecognised backbone: expected BERT (encoder.layer.N) or DistilBERT (transformer.layer.N) weights")
    if layers > len(available):
        raise ValueError(f"model.layers={layers} but the backbone has only {len(available)} layers")
    mapping = dict(top)
    for i in range(layers):
        for mine, theirs in names.items():
            for p in ("weight", "bias"):
                mapping[f"blocks.{i}.{mine}.{p}"] = f"{prefix}.{i}.{theirs}.{p}"
    return mapping
