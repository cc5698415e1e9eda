"""Variants of the image–text matcher (models/matching.py), each scored two ways: retrieval on the dev references
(R@5 both ways) and the CIDEr of its choice among a diffusion model's N cached samples of each dev image, alone and
added to autoregressive log-probabilities (log p + w x cosine), on all of dev and on its two halves.

    python benchmarks/matcher_variants.py runs/sel/shipped8.json --variants base base:0,1,2 hard grid batch1024 \
        [--rerank runs/ar/cider15/checkpoint runs/ar/xe20/checkpoint] [--encoder efficientnet_lite2] \
        [--root ../shared/data/flickr8k] [--out runs/mexp]

The candidates file is what `benchmarks/selection.py --cache` writes. Variants (`NAME[:SEED,SEED...]`, several
seeds average their cosines): `base` the shipped recipe (pooled vector, batch 256, 40 epochs); `batch1024`
(batch 1024, 80 epochs, lr 2e-3); `grid` (the pooled vector and 4 attention-pooled views of the 7x7 grid);
`hard` (every other epoch in batches of similar images, k-means with 24 clusters on the pooled vectors, so the
other captions of a batch are hard negatives). With two --rerank models the mean of their log-probabilities is
tried too. --encoder gives the matcher another image encoder's features (cached by `diffcap features --encoder
NAME` first); the autoregressive models keep the diffusion model's. Sentence vectors are kept under --out.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from diffcap.config import DataConfig
from diffcap.data.prepare import FeatureTable, default_cache_dir, ensure_features, load_encoder, split_records
from diffcap.metrics import score_captions
from diffcap.models.matching import ImageTextMatcher, MatcherShape, fit_matcher
from diffcap.pipeline import caption_log_likelihood, load_model, load_reranker
from diffcap.text.retrieval import sentence_vectors

Embedders = tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]


class GridMatcher(nn.Module):
    """Image side: the pooled vector and `queries` attention-pooled views of the grid cells."""

    def __init__(self, pooled_dim: int, grid_dim: int, text_dim: int, hidden: int = 1024, dim: int = 256,
                 queries: int = 4) -> None:
        super().__init__()
        self.key = nn.Linear(grid_dim, queries)
        self.image = nn.Sequential(nn.Linear(pooled_dim + queries * grid_dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.text = nn.Sequential(nn.Linear(text_dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def embed_image(self, pooled: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        weights = self.key(grid.float()).softmax(1)  # (B, cells, queries)
        views = torch.einsum("bnq,bnd->bqd", weights, grid.float()).flatten(1)
        return F.normalize(self.image(torch.cat([pooled.float(), views], -1)), dim=-1)

    def embed_text(self, sentences: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text(sentences.float()), dim=-1)


def fit_variant(kind: str, table: FeatureTable, sentences: torch.Tensor, owners: torch.Tensor, seed: int) -> Embedders:
    pooled = table.pooled.float()
    if kind in ("base", "batch1024"):
        options = dict(batch_size=1024, epochs=80, lr=2e-3) if kind == "batch1024" else {}
        m = fit_matcher(pooled, sentences, owners, seed=seed, **options)
        return (lambda p, g: m.embed_image(p)), m.embed_text
    if kind not in ("grid", "hard"):
        raise SystemExit(f"unknown variant {kind!r}")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model: nn.Module = (GridMatcher(pooled.shape[1], table.grid.shape[2], sentences.shape[1]) if kind == "grid"
                        else ImageTextMatcher(MatcherShape(pooled.shape[1], sentences.shape[1])))
    clusters = 24
    unit = F.normalize(pooled, dim=-1)
    centres = unit[torch.randperm(len(unit), generator=g)[:clusters]]
    for _ in range(20):  # k-means on the pooled vectors (used by "hard")
        label = (unit @ centres.T).argmax(1)
        centres = F.normalize(torch.stack([unit[label == c].mean(0) if (label == c).any() else centres[c]
                                           for c in range(clusters)]), dim=-1)
    counts = torch.bincount(owners, minlength=len(pooled))
    order, first = torch.argsort(owners, stable=True), torch.cumsum(counts, 0) - counts
    epochs, batch = 40, 256
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=1e-3, total_steps=epochs * math.ceil(len(pooled) / batch),
                                                   pct_start=0.1)
    for epoch in range(epochs):
        images = torch.randperm(len(pooled), generator=g)
        if kind == "hard" and epoch % 2:  # clusters in random order, images shuffled within each
            rank = torch.randperm(clusters, generator=g)
            images = images[torch.argsort(rank[label[images]], stable=True)]
        for start in range(0, len(images), batch):
            rows = images[start: start + batch]
            if len(rows) < 2:
                continue
            pick = first[rows] + (torch.rand(len(rows), generator=g) * counts[rows]).long()
            image = model.embed_image(pooled[rows], table.grid[rows]) if kind == "grid" else model.embed_image(pooled[rows])
            logits = model.log_scale.clamp(max=math.log(100)).exp() * image @ model.embed_text(sentences[order[pick]]).T
            target = torch.arange(len(rows))
            loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
    model.eval()
    if kind == "grid":
        return model.embed_image, model.embed_text
    return (lambda p, g: model.embed_image(p)), model.embed_text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("candidates", type=Path, help="the --cache file of benchmarks/selection.py")
    p.add_argument("--variants", nargs="+", default=["base"])
    p.add_argument("--rerank", type=Path, nargs="*", default=[], metavar="AR_CHECKPOINT")
    p.add_argument("--weights", type=float, nargs="+", default=[2.0, 4.0, 8.0])
    p.add_argument("--encoder", default=None, help="the matcher's image features (default: the diffusion model's)")
    p.add_argument("--root", default="../shared/data/flickr8k")
    p.add_argument("--out", type=Path, default=Path("runs/mexp"))
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    saved = json.loads(args.candidates.read_text())
    candidates: list[list[str]] = saved["candidates"]
    model, meta = load_model(Path(saved["checkpoint"]))

    def tables(encoder_name: str) -> dict[str, tuple[list, FeatureTable]]:
        encoder, splits = load_encoder(encoder_name), {}
        for split in ("train", "dev"):
            records = split_records(DataConfig(root=args.root), split)
            cache = ensure_features(encoder, records, default_cache_dir("flickr8k", Path(args.root), encoder.name) / split)
            records = [r for r in records if r.key in cache]
            splits[split] = records, FeatureTable.from_cache(cache, [r.key for r in records])
        return splits

    splits = tables(model.config.encoder.name)
    (train, train_table), (dev, dev_table) = splits["train"], splits["dev"]
    match_splits = splits if args.encoder in (None, model.config.encoder.name) else tables(args.encoder)
    if [r.key for r in match_splits["dev"][0]] != [r.key for r in dev]:
        raise SystemExit(f"the {args.encoder} feature cache lacks dev images: run diffcap features --encoder {args.encoder}")
    match_train_table, match_dev_table = match_splits["train"][1], match_splits["dev"][1]
    n, rows = len(candidates), len(dev)

    def vectors(name: str, sentences: list[str]) -> torch.Tensor:
        path = args.out / f"vectors_{name}.pt"
        if not path.exists():
            torch.save(sentence_vectors(model.config.text.backbone, sentences, progress=True), path)
        return torch.load(path, weights_only=True)

    train_vectors = vectors("train", [c for r in train for c in r.captions])
    dev_vectors = vectors("dev", [c for r in dev for c in r.captions])
    candidate_vectors = vectors(f"candidates_{args.candidates.stem}", [c for row in candidates for c in row]).view(n, rows, -1)
    owners = torch.tensor([i for i, r in enumerate(match_splits["train"][0]) for _ in r.captions])
    dev_owners = torch.tensor([i for i, r in enumerate(dev) for _ in r.captions])
    references = {r.key: list(r.captions) for r in dev}

    def cider(choice: list[int], lo: int, hi: int) -> float:
        hyp = {dev[i].key: candidates[choice[i]][i] for i in range(lo, hi)}
        return score_captions(hyp, {k: references[k] for k in hyp}, meteor=False).metrics["CIDEr"]

    def report(name: str, score: torch.Tensor) -> None:
        choice = score.argmax(0).tolist()
        print(f"| {name} | {cider(choice, 0, rows):.1f} | {cider(choice, 0, rows // 2):.1f} | "
              f"{cider(choice, rows // 2, rows):.1f} |", flush=True)

    pooled, grid = match_dev_table.pooled.float(), match_dev_table.grid.float()
    cosines: dict[str, torch.Tensor] = {}
    print(f"{rows} dev images, {n} candidates each; CIDEr on all / first half / second half\n")
    print(f"| choice | all | 0–{rows // 2} | {rows // 2}–{rows} |\n|---|---|---|---|")
    for spec in args.variants:
        kind, _, seeds = spec.partition(":")
        per_seed = []
        for seed in [int(s) for s in (seeds or "0").split(",")]:
            embed_image, embed_text = fit_variant(kind, match_train_table, train_vectors, owners, seed)
            with torch.no_grad():
                images = embed_image(pooled, grid)
                sims = embed_text(dev_vectors) @ images.T
                t2i = (sims.topk(5, 1).indices == dev_owners[:, None]).any(1).float().mean().item()
                i2t = (dev_owners[sims.T.topk(5, 1).indices] == torch.arange(rows)[:, None]).any(1).float().mean().item()
                print(f"<!-- {kind} seed {seed}: dev R@5 text->image {t2i:.3f}, image->text {i2t:.3f} -->", flush=True)
                per_seed.append(torch.stack([(embed_text(candidate_vectors[k]) * images).sum(-1) for k in range(n)]))
        cosines[spec] = torch.stack(per_seed).mean(0)
        report(f"match {spec}", cosines[spec])
        first_four = cosines[spec].clone()
        first_four[4:] = -math.inf
        report(f"match {spec}, first 4 candidates", first_four)

    logps: dict[str, torch.Tensor] = {}
    for ar_dir in args.rerank:
        reranker = load_reranker(ar_dir, model, meta)
        logp = torch.empty(n, rows)
        with torch.no_grad():
            for start in range(0, rows, 256):
                idx = torch.arange(start, min(start + 256, rows))
                image = dev_table.batch(idx, "cpu")
                for k in range(n):
                    logp[k, idx] = caption_log_likelihood(reranker, image, [candidates[k][i] for i in idx.tolist()])
        logps[ar_dir.parent.name] = logp
    if len(logps) == 2:
        logps["mean of both"] = sum(logps.values()) / 2
    for name, logp in logps.items():
        report(f"log p {name}", logp)
        for spec, cosine in cosines.items():
            for w in args.weights:
                report(f"log p {name} + {w:g} x match {spec}", logp + w * cosine)


if __name__ == "__main__":
    main()
