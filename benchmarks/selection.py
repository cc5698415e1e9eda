"""How to choose one caption among a diffusion model's N samples of each dev image: the first sample, minimum
Bayes risk (MBR), the autoregressive model's likelihood (`evaluate --candidates N --rerank AR`), the two
combined (log-probability + weight x MBR agreement), the summed log-probability over length^alpha, an
image–text matcher fitted on the training captions (models/matching.py; alone, as cosine + weight x MBR
agreement, and as log-probability + weight x cosine agreement), and an oracle that knows the references (the ceiling of any choice).
Full dev, pycocoevalcap/PTB CIDEr; each rule also on the two halves of dev, so that a weight chosen on one half
can be checked on the other.

    python benchmarks/selection.py DIFFUSION_CHECKPOINT [--rerank AR_CHECKPOINT] [--candidates 8] \
        [--cache FILE.json] [--weights 0.5 1 2 4] [--alphas 0.5 0.8] [--match-weights 1 2 4] \
        [--mbr-weights 0.5 1] [--stored-matcher | --matcher-encoder NAME] [--learned] [--root ../shared/data/flickr8k]

Without --rerank only the rules that need no autoregressive model are measured. --stored-matcher scores with
the checkpoint's own matcher (what `diffcap fit-matcher` stored) instead of fitting one here. --learned adds a
linear rule over all the scores (cross-fitted: its weights for each half of dev come from the other half).

The N candidates of every image (candidate k from seed + k, as `evaluate --candidates` draws them) are kept in
--cache, so a second call with another reranker or other weights does not sample again, and a call with more
candidates than the cache holds samples only the missing ones.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from diffcap.config import DataConfig
from diffcap.data.prepare import FeatureTable, default_cache_dir, ensure_features, load_encoder, split_records
from diffcap.evaluate import caption_table
from diffcap.metrics import score_captions
from diffcap.models.matching import retrieval_recall
from diffcap.pipeline import caption_log_likelihood, fit_caption_matcher, load_model, load_reranker
from diffcap.pipeline import matcher_scores as pipeline_matcher_scores
from diffcap.rewards import CiderD
from diffcap.selection import mbr_scores
from diffcap.text.retrieval import sentence_vectors


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--rerank", type=Path, default=None, metavar="AR_CHECKPOINT",
                   help="an autoregressive model for the likelihood rules (none: skip them)")
    p.add_argument("--candidates", type=int, default=8)
    p.add_argument("--cache", type=Path, default=None, help="JSON file of the candidates (written when missing)")
    p.add_argument("--weights", type=float, nargs="+", default=[0.5, 1.0, 2.0, 4.0])
    p.add_argument("--alphas", type=float, nargs="+", default=[0.5, 0.8],
                   help="length normalisation of the summed log-probability (1 = the mean, plain rerank)")
    p.add_argument("--match-weights", type=float, nargs="*", default=[1.0, 2.0, 4.0],
                   help="log-probability + weight x matcher cosine (none: skip the matcher)")
    p.add_argument("--mbr-weights", type=float, nargs="*", default=[0.5, 1.0],
                   help="matcher cosine + weight x MBR agreement")
    p.add_argument("--matcher-encoder", default=None,
                   help="fit the matcher on another image encoder's features (cached by `diffcap features --encoder`)")
    p.add_argument("--stored-matcher", action="store_true",
                   help="use the checkpoint's matcher instead of fitting one on the training split")
    p.add_argument("--root", default="../shared/data/flickr8k")
    p.add_argument("--limit", type=int, default=None, help="only the first N dev images (a quick check)")
    p.add_argument("--learned", action="store_true",
                   help="also a linear rule over every score above, fitted on one half of dev and scored on the other")
    args = p.parse_args()
    model, meta = load_model(Path(args.checkpoint))
    reranker = None if args.rerank is None else load_reranker(args.rerank, model, meta)
    if args.stored_matcher and model.matcher is None:
        raise SystemExit(f"{args.checkpoint} holds no matcher: add one with `diffcap fit-matcher`")
    records = split_records(DataConfig(root=args.root), "dev")[: args.limit]
    encoder = load_encoder(model.config.encoder.name)
    cache = ensure_features(encoder, records, default_cache_dir("flickr8k", Path(args.root), encoder.name) / "dev")
    records = [r for r in records if r.key in cache]
    table = FeatureTable.from_cache(cache, [r.key for r in records])
    n, seed = args.candidates, model.config.sample.seed

    per_seed: list[list[str]] = []
    if args.cache is not None and args.cache.exists():
        cached = json.loads(args.cache.read_text())
        per_seed = cached["candidates"]
        if len(per_seed) < n and (cached["checkpoint"], cached["seed"]) != (args.checkpoint, seed):
            raise SystemExit(f"{args.cache}: sampled from {cached['checkpoint']} (seed {cached['seed']}); "
                             f"extending it needs that checkpoint and seed")
        if len(per_seed[0]) != len(records):
            raise SystemExit(f"{args.cache}: holds candidates of {len(per_seed[0])} images, not {len(records)}")
        per_seed = per_seed[:n]
    if len(per_seed) < n:  # sample what the cache lacks: candidate k from seed + k, so a cache of 8 extends to 16
        per_seed += [caption_table(model, table, seed=seed + k, desc=f"candidate {k + 1}/{n}")
                     for k in range(len(per_seed), n)]
        if args.cache is not None:
            args.cache.write_text(json.dumps({"checkpoint": args.checkpoint, "seed": seed, "candidates": per_seed}))

    rows = len(records)
    logp = torch.empty(n, rows)  # mean log-probability per word piece
    pieces = torch.empty(n, rows)  # word pieces of each candidate, [SEP] included
    with torch.no_grad():
        for start in range(0, rows if reranker is not None else 0, 256):
            idx = torch.arange(start, min(start + 256, rows))
            image = table.batch(idx, "cpu")
            for k in range(n):
                chunk = [per_seed[k][i] for i in idx.tolist()]
                logp[k, idx] = caption_log_likelihood(reranker, image, chunk)
                pieces[k, idx] = (reranker.space.encode(chunk) != reranker.space.pad_index).sum(-1).float()
    per_image = [[per_seed[k][i] for k in range(n)] for i in range(rows)]
    match = torch.zeros(n, rows)  # matcher cosine of each candidate with its image
    if args.match_weights or args.stored_matcher:
        match = matcher_scores(args, encoder, model, table, records, per_seed)
    references = {r.key: list(r.captions) for r in records}
    oracle_reward = CiderD([r.captions for r in records])
    half = rows // 2
    learned = torch.zeros(n, rows)
    if args.learned:
        if reranker is None or not (args.match_weights or args.stored_matcher):
            raise SystemExit("--learned needs --rerank and the matcher")
        agreement = torch.tensor([mbr_scores(row) for row in per_image]).T
        features = torch.stack([logp, logp * pieces, pieces, match, agreement])  # (F, N, images)
        learned = cross_fitted_scores(features, records, per_image, half)

    def choose(rule: str, m: int, weight: float = 0.0) -> list[str]:
        chosen = []
        for i, row in enumerate(per_image):
            row = row[:m]
            if rule == "first":
                score = [0.0] * m
            elif rule == "oracle":
                score = oracle_reward.scores(row, [i] * m)
            elif rule == "mbr":
                score = mbr_scores(row)
            elif rule == "rerank":
                score = logp[:m, i].tolist()
            elif rule == "match":
                score = match[:m, i].tolist()
            elif rule == "match-mbr":
                score = (match[:m, i] + weight * torch.tensor(mbr_scores(row))).tolist()
            elif rule == "rerank-match":
                score = (logp[:m, i] + weight * match[:m, i]).tolist()
            elif rule == "learned":
                score = learned[:m, i].tolist()
            elif rule == "rerank-alpha":  # GNMT-style: summed log-probability / length^alpha (alpha = 1: the mean)
                score = (logp[:m, i] * pieces[:m, i] ** (1 - weight)).tolist()
            else:  # hybrid
                score = [lp + weight * a for lp, a in zip(logp[:m, i].tolist(), mbr_scores(row))]
            chosen.append(row[max(range(m), key=lambda k: (score[k], -k))])
        return chosen

    def cider(captions: list[str], lo: int, hi: int) -> float:
        hyp = {records[i].key: captions[i] for i in range(lo, hi)}
        return score_captions(hyp, {k: references[k] for k in hyp}, meteor=False).metrics["CIDEr"]

    print(f"{rows} dev images, {n} candidates each; CIDEr on all / first half / second half\n")
    print("| choice | candidates | all | 0–{0} | {0}–{1} | words/caption |".format(half, rows))
    print("|---|---|---|---|---|---|")
    with_ar = ("rerank",) if reranker is not None else ()
    plan = [("first", 1, 0.0)] + [(rule, m, 0.0) for m in sorted({min(4, n), n}) for rule in ("mbr", *with_ar)]
    if reranker is not None:
        plan += [("rerank-alpha", n, a) for a in args.alphas]
        plan += [("hybrid", n, w) for w in args.weights]
    if args.match_weights or args.stored_matcher:
        plan += [("match", m, 0.0) for m in sorted({min(4, n), n})] + [("match-mbr", n, w) for w in args.mbr_weights]
        if reranker is not None:
            plan += [("rerank-match", n, w) for w in args.match_weights]
    if args.learned:
        plan += [("learned", m, 0.0) for m in sorted({min(4, n), min(8, n), n})]
    plan += [("oracle", n, 0.0)]
    for rule, m, weight in plan:
        captions = choose(rule, m, weight)
        words = sum(len(c.split()) for c in captions) / rows
        name = {"hybrid": f"hybrid, weight {weight:g}", "rerank-alpha": f"rerank, length^{weight:g}",
                "rerank-match": f"rerank + {weight:g} x match", "match-mbr": f"match + {weight:g} x MBR"}.get(rule, rule)
        print(f"| {name} | {m} | {cider(captions, 0, rows):.1f} | {cider(captions, 0, half):.1f} | "
              f"{cider(captions, half, rows):.1f} | {words:.1f} |", flush=True)


FEATURES = ("mean log p", "summed log p", "word pieces", "matcher cosine", "MBR agreement")


def cross_fitted_scores(features: torch.Tensor, records: list, per_image: list[list[str]], half: int) -> torch.Tensor:
    """(N, images) scores of a linear rule over `features` (F, N, images): for each half of dev, weights fitted on
    the other half to maximise the expected CIDEr-D of a softmax choice among each image's candidates (listwise),
    the reward computed against that other half's references only. Features are standardised on the fitting half."""
    rows = features.shape[-1]
    scores = torch.empty(features.shape[1:])
    for fit, apply in ((range(half, rows), range(0, half)), (range(0, half), range(half, rows))):
        fit_idx, apply_idx = torch.tensor(list(fit)), torch.tensor(list(apply))
        reward_fn = CiderD([records[i].captions for i in fit])
        reward = torch.tensor([reward_fn.scores(per_image[i], [j] * len(per_image[i]))
                               for j, i in enumerate(fit)]).T  # (N, fit images)
        x = features[:, :, fit_idx]
        mean, std = x.mean(dim=(1, 2), keepdim=True), x.std(dim=(1, 2), keepdim=True).clamp_min(1e-6)
        x = (x - mean) / std
        weight = torch.zeros(features.shape[0], 1, 1, requires_grad=True)
        optimiser = torch.optim.Adam([weight], lr=0.05)
        for _ in range(500):
            optimiser.zero_grad()
            choice = torch.softmax((weight * x).sum(0), dim=0)  # over the candidates of each image
            loss = -(choice * reward).sum(0).mean() + 1e-3 * weight.pow(2).sum()
            loss.backward()
            optimiser.step()
        w = weight.detach()
        scores[:, apply_idx] = (w * (features[:, :, apply_idx] - mean) / std).sum(0)
        print(f"learned rule, fitted on dev {fit.start}–{fit.stop}: "
              + ", ".join(f"{name} {v:+.2f}" for name, v in zip(FEATURES, w.flatten().tolist())))
    return scores


def matcher_scores(args: argparse.Namespace, encoder, model, table: FeatureTable, records: list,
                   per_seed: list[list[str]]) -> torch.Tensor:
    """(N, images) cosine of every candidate with its image, by a matcher fitted on the training split
    (what `diffcap fit-matcher` stores; on --matcher-encoder's features if given), or by the checkpoint's own with
    --stored-matcher."""
    if args.matcher_encoder not in (None, encoder.name):
        if args.stored_matcher:
            raise SystemExit("--stored-matcher uses the checkpoint's encoder; drop --matcher-encoder")
        encoder = load_encoder(args.matcher_encoder)
        cache = ensure_features(encoder, records, default_cache_dir("flickr8k", Path(args.root), encoder.name) / "dev")
        table = FeatureTable.from_cache(cache, [r.key for r in records])
    if not args.stored_matcher:
        train = split_records(DataConfig(root=args.root), "train")
        cache = ensure_features(encoder, train, default_cache_dir("flickr8k", Path(args.root), encoder.name) / "train")
        train = [r for r in train if r.key in cache]
        train_table = FeatureTable.from_cache(cache, [r.key for r in train])
        model.matcher = fit_caption_matcher(model, train_table.pooled, [r.captions for r in train], progress=True)
    dev_captions = [c for r in records for c in r.captions]
    dev_owners = torch.tensor([i for i, r in enumerate(records) for _ in r.captions])
    vectors = sentence_vectors(model.config.text.backbone, dev_captions)
    t2i, i2t = retrieval_recall(model.matcher, table.pooled, vectors, dev_owners, k=5)
    print(f"matcher on dev references: text->image R@5 {t2i:.3f}, image->text R@5 {i2t:.3f} "
          f"({len(records)} images)")
    image = table.batch(torch.arange(len(table.keys)), torch.device("cpu"))
    with torch.no_grad():
        return torch.stack([pipeline_matcher_scores(model, image, c) for c in per_seed])


if __name__ == "__main__":
    main()
