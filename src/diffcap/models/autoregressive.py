"""The autoregressive baseline: a causal transformer decoder over the same word pieces, image features and backbone.

It exists so the diffusion captioner can be compared with the standard way of captioning inside one codebase:
same tokenizer and (restricted) vocabulary, same cached EfficientNet/CLIP features, same pretrained layers,
same training loop and the same `diffcap evaluate` command.

Sequence (length L = text.max_length):

    position 0: the projected pooled image vector;  position i > 0: the embedding of word piece i - 1

and the output at position i predicts word piece i (the caption's pieces, then [SEP]). Every block attends
causally to the positions before it and cross-attends to the projected feature grid (the "memory"). The output
layer is tied to the word embeddings (BERT's MLM head shape: dense, GELU, LayerNorm, then the tied table).
Decoding is greedy or beam search with a key/value cache, so each new word costs one position, not a
re-run of the whole prefix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from diffcap.models.denoiser import Block, ImageFeatures, KVCache, backbone_key_map, bert_init
from diffcap.models.ops import dropout


@dataclass(frozen=True)
class DecoderShape:
    vocab_size: int
    hidden: int
    heads: int
    intermediate: int
    layers: int
    max_length: int
    pooled_dim: int
    grid_dim: int
    grid_pool: int
    dropout: float
    layer_norm_eps: float = 1e-12
    pre_norm: bool = False  # model.norm == "pre": pre-LayerNorm blocks and a final LayerNorm before the head


class CaptionDecoder(nn.Module):
    def __init__(self, shape: DecoderShape) -> None:
        super().__init__()
        s = self.shape = shape
        H = s.hidden
        self.embed = nn.Embedding(s.vocab_size, H)
        self.positions = nn.Embedding(s.max_length, H)
        self.embed_norm = nn.LayerNorm(H, eps=s.layer_norm_eps)
        self.pooled_proj = nn.Linear(s.pooled_dim, H)
        self.grid_proj = nn.Linear(s.grid_dim, H)
        self.memory_positions = nn.Parameter(torch.zeros(s.grid_pool**2, H))
        self.memory_norm = nn.LayerNorm(H, eps=s.layer_norm_eps)
        self.blocks = nn.ModuleList(
            Block(H, s.heads, s.intermediate, s.dropout, s.layer_norm_eps, cross=True, pre_norm=s.pre_norm)
            for _ in range(s.layers)
        )
        self.final_norm = nn.LayerNorm(H, eps=s.layer_norm_eps) if s.pre_norm else nn.Identity()
        self.head = nn.Sequential(nn.Linear(H, H), nn.GELU(), nn.LayerNorm(H, eps=s.layer_norm_eps))
        self.out_bias = nn.Parameter(torch.zeros(s.vocab_size))
        bert_init(self)
        nn.init.normal_(self.memory_positions, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.cross_out.weight)  # start as the pretrained (text-only) layers

    def load_backbone(self, state: dict[str, torch.Tensor], word_embeddings: torch.Tensor, layers: bool = True) -> None:
        """The word embeddings of our vocabulary, positions and embedding LayerNorm, and with `layers` the
        pretrained blocks (model.init_from_backbone)."""
        own = self.state_dict()
        loaded = {}
        for mine, theirs in backbone_key_map(state, len(self.blocks)).items():
            if mine == "types.weight" or (mine.startswith("blocks.") and not layers):
                continue
            value = state[theirs][: self.shape.max_length] if mine == "positions.weight" else state[theirs]
            if own[mine].shape != value.shape:
                raise ValueError(f"backbone weight {theirs} has shape {tuple(value.shape)}, expected {tuple(own[mine].shape)}")
            loaded[mine] = value
        if word_embeddings.shape != self.embed.weight.shape:
            raise ValueError(f"word embeddings {tuple(word_embeddings.shape)} != {tuple(self.embed.weight.shape)}")
        loaded["embed.weight"] = word_embeddings
        self.load_state_dict(loaded, strict=False)

    # -- pieces ------------------------------------------------------------------------------------------
    def memory(self, image: ImageFeatures) -> torch.Tensor:
        """(B, P*P, H) the projected, pooled feature grid."""
        B, N, Dg = image.grid.shape
        side = math.isqrt(N)
        grid = image.grid.transpose(1, 2).reshape(B, Dg, side, side)
        grid = F.adaptive_avg_pool2d(grid, self.shape.grid_pool).flatten(2).transpose(1, 2)  # (B, P*P, Dg)
        return self.memory_norm(self.grid_proj(grid) + self.memory_positions)

    def inputs(self, image: ImageFeatures, ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        """(B, n, H) embedded positions start..start+n-1 where ids (B, n') are the word pieces before them."""
        first = self.pooled_proj(image.pooled).unsqueeze(1)  # (B, 1, H)
        h = torch.cat([first, self.embed(ids)], 1) if start == 0 else self.embed(ids)
        n = h.shape[1]
        return dropout(self.embed_norm(h + self.positions.weight[start: start + n]), self.shape.dropout, self.training)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(self.final_norm(h)) @ self.embed.weight.T + self.out_bias  # (B, n, V)

    # -- training ----------------------------------------------------------------------------------------
    def forward(self, ids: torch.Tensor, image: ImageFeatures) -> torch.Tensor:
        """Teacher forcing: (B, L) target indices -> (B, L, V) logits, position i predicting ids[:, i]."""
        memory = self.memory(image)
        h = self.inputs(image, ids[:, :-1])  # (B, L, H)
        for block in self.blocks:
            h = block(h, memory, causal=True)
        return self.logits(h)

    # -- decoding ----------------------------------------------------------------------------------------
    def _step(self, h: torch.Tensor, memory_kv: list[tuple[torch.Tensor, torch.Tensor]],
              cache: list[KVCache]) -> torch.Tensor:
        """One new position (B, 1, H) through every block, extending the self-attention caches in place."""
        for block, kv, block_cache in zip(self.blocks, memory_kv, cache):
            h = block(h, memory_kv=kv, cache=block_cache)
        return self.logits(h)[:, -1]  # (B, V)

    @torch.no_grad()
    def generate(self, image: ImageFeatures, *, end: tuple[int, ...], banned: tuple[int, ...] = (),
                 beam_size: int = 1, sample: bool = False, temperature: float = 1.0) -> torch.Tensor:
        """(B, L) word-piece indices; a row stops at the first of the `end` indices (then repeats `end[0]`),
        or at L. `banned` indices are never generated. `sample`: draw each word from the model's distribution
        (torch's global RNG) instead of taking the most likely one (self-critical training's samples), from
        softmax(logits / `temperature`)."""
        if sample and beam_size > 1:
            raise ValueError("sampling draws one caption per row: use beam_size=1")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        B, K, L = len(image), beam_size, self.shape.max_length
        if K > 1:
            image = ImageFeatures(image.pooled.repeat_interleave(K, 0), image.grid.repeat_interleave(K, 0))
        memory = self.memory(image)
        memory_kv = [(b.cross_key(memory), b.cross_value(memory)) for b in self.blocks]
        cache = [KVCache() for _ in self.blocks]
        device = memory.device
        end_ids = torch.tensor(end, device=device)
        tokens = torch.empty(B * K, 0, dtype=torch.long, device=device)
        scores = torch.zeros(B, K, device=device)
        scores[:, 1:] = -math.inf  # all beams start identical: keep one
        done = torch.zeros(B * K, dtype=torch.bool, device=device)
        h = self.inputs(image, tokens[:, :0])  # position 0: the image
        for position in range(L):
            logp = self._step(h, memory_kv, cache).float().log_softmax(-1)  # (B*K, V)
            if banned:
                logp[:, list(banned)] = -math.inf
            if end:  # a finished row may only repeat its end token, at no cost
                logp[done] = -math.inf
                logp[done, end[0]] = 0.0
            if sample:
                next_ids = torch.multinomial((logp / temperature).softmax(-1), 1).squeeze(1)
            elif K == 1:
                next_ids = logp.argmax(-1)
            else:
                V = logp.shape[-1]
                total = (scores.view(B, K, 1) + logp.view(B, K, V)).view(B, K * V)
                scores, flat = total.topk(K, dim=-1)  # (B, K), best first
                beam = flat // V + torch.arange(B, device=device).unsqueeze(1) * K  # rows they extend
                beam, next_ids = beam.view(-1), (flat % V).view(-1)
                tokens, done = tokens[beam], done[beam]
                for block_cache in cache:
                    block_cache.reorder(beam)
            tokens = torch.cat([tokens, next_ids.unsqueeze(1)], 1)
            done = done | torch.isin(next_ids, end_ids)
            if bool(done.all()) or position == L - 1:
                break
            h = self.inputs(image, next_ids.unsqueeze(1), start=position + 1)
        if tokens.shape[1] < L:  # every row ended early
            tokens = F.pad(tokens, (0, L - tokens.shape[1]), value=end[0])
        return tokens.view(B, K, L)[:, 0]  # the best beam
