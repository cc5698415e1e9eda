"""A diffusion model's own score of its samples, to choose among them: how well the model denoises a candidate
caption back from fixed noise levels, given the image (the per-sample denoising loss, an ELBO-like reading of
how likely the model finds the caption). For each cached candidate (the `benchmarks/selection.py --cache` file):
the mean squared error of the x0 estimate and the cross-entropy of the candidate's word pieces under the rounding
logits of that estimate, at each of --levels (one noise draw per image, shared by its candidates, and the
self-conditioning pass as in training); then the CIDEr of choosing by each, alone and added to the checkpoint's
matcher cosine (its own fp16 matcher, as the shipped default uses it), on all of dev and on its two halves.

    python benchmarks/self_score.py runs/sel/shipped8.json [--checkpoint src/diffcap/assets/checkpoint] \
        [--levels 100 300 500 800] [--weights 0.25 0.5 1 2] [--rerank AR_CHECKPOINT] [--save SCORES.pt] \
        [--limit N] [--root ../shared/data/flickr8k]

The weight w multiplies the self-score after scaling it to the matcher's spread across candidates (mean over
images of the standard deviation across an image's candidates), so w = 1 gives both the same say.
--rerank adds an autoregressive model's log-probabilities of the same candidates (`caption_log_likelihood`, as
`evaluate --rerank` uses it), as log p + 4 x (cosine + w x scaled self-score).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from diffcap.config import DataConfig
from diffcap.data.prepare import FeatureTable, default_cache_dir, ensure_features, load_encoder, split_records
from diffcap.metrics import score_captions
from diffcap.pipeline import caption_log_likelihood, load_model, load_reranker, matcher_scores


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("candidates", type=Path, help="the --cache file of benchmarks/selection.py")
    p.add_argument("--checkpoint", type=Path, default=Path("src/diffcap/assets/checkpoint"),
                   help="the diffusion model that sampled them, with a matcher (diffcap fit-matcher)")
    p.add_argument("--levels", type=int, nargs="+", default=[100, 300, 500, 800])
    p.add_argument("--weights", type=float, nargs="+", default=[0.25, 0.5, 1.0, 2.0])
    p.add_argument("--rerank", type=Path, default=None, metavar="AR_CHECKPOINT")
    p.add_argument("--root", default="../shared/data/flickr8k")
    p.add_argument("--limit", type=int, default=None, help="only the first N dev images (a quick check)")
    p.add_argument("--save", type=Path, default=None, help="save the scores (mse, ce, match) here")
    args = p.parse_args()
    candidates: list[list[str]] = json.loads(args.candidates.read_text())["candidates"]
    model, meta = load_model(args.checkpoint)
    if model.matcher is None or model.autoregressive:
        raise SystemExit(f"{args.checkpoint}: needs a diffusion model with a matcher (diffcap fit-matcher)")
    records = split_records(DataConfig(root=args.root), "dev")[: args.limit]
    candidates = [row[: len(records)] for row in candidates]
    encoder = load_encoder(model.config.encoder.name)
    cache = ensure_features(encoder, records, default_cache_dir("flickr8k", Path(args.root), encoder.name) / "dev")
    table = FeatureTable.from_cache(cache, [r.key for r in records])
    n, rows, levels = len(candidates), len(records), args.levels
    denoiser, diffusion, space = model.denoiser.eval(), model.diffusion, model.space
    mse, ce, match = torch.zeros(len(levels), n, rows), torch.zeros(len(levels), n, rows), torch.zeros(n, rows)
    reranker = None if args.rerank is None else load_reranker(args.rerank, model, meta)
    logp = torch.zeros(n, rows)
    with torch.no_grad():
        for start in range(0, rows, 125):
            idx = torch.arange(start, min(start + 125, rows))
            image, keep = table.batch(idx, "cpu"), torch.ones(len(idx), dtype=torch.bool)
            g, noise = torch.Generator().manual_seed(start), None

            def network(x: torch.Tensor, t: torch.Tensor, sc: torch.Tensor | None) -> torch.Tensor:
                return denoiser(x, t, image, keep, sc)

            for k in range(n):
                captions = [candidates[k][i] for i in idx.tolist()]
                match[k, idx] = matcher_scores(model, image, captions)
                if reranker is not None:
                    logp[k, idx] = caption_log_likelihood(reranker, image, captions)
                ids = space.encode(captions)
                x0 = space.embed(ids, model.word_table)
                noise = torch.randn(x0.shape, generator=g) if noise is None else noise
                for j, t in enumerate(levels):
                    pred = diffusion.training_prediction(network, x0, torch.full((len(idx),), t), noise, True)
                    mse[j, k, idx] = ((pred.x0_hat - x0) ** 2).mean((1, 2))
                    pieces = space.logits(pred.x0_hat, model.word_table).float().log_softmax(-1)
                    ce[j, k, idx] = -pieces.gather(-1, ids.unsqueeze(-1)).squeeze(-1).mean(1)
            print(f"scored {idx[-1] + 1}/{rows} images", flush=True)

    if args.save is not None:
        torch.save({"mse": mse, "ce": ce, "match": match, "logp": logp, "levels": levels}, args.save)
    references = {r.key: list(r.captions) for r in records}

    def cider(score: torch.Tensor, lo: int, hi: int) -> float:
        choice = score.argmax(0).tolist()
        hyp = {records[i].key: candidates[choice[i]][i] for i in range(lo, hi)}
        return score_captions(hyp, {k: references[k] for k in hyp}, meteor=False).metrics["CIDEr"]

    def report(name: str, score: torch.Tensor) -> None:
        print(f"| {name} | {cider(score, 0, rows):.1f} | {cider(score, 0, rows // 2):.1f} | "
              f"{cider(score, rows // 2, rows):.1f} |", flush=True)

    def spread(score: torch.Tensor) -> torch.Tensor:
        return score.std(0).mean()

    first_four = torch.zeros(n, rows)
    first_four[4:] = -float("inf")
    print(f"\n{rows} dev images, {n} candidates each; CIDEr on all / first half / second half\n")
    print(f"| choice | all | 0–{rows // 2} | {rows // 2}–{rows} |\n|---|---|---|---|")
    report("matcher cosine", match)
    report("matcher cosine, first 4", match + first_four)
    for j, t in enumerate(levels):
        report(f"-MSE at t={t}", -mse[j])
        report(f"-CE at t={t}", -ce[j])
    self_mse, self_ce = -mse.mean(0), -ce.mean(0)
    report("-MSE, mean over levels", self_mse)
    report("-CE, mean over levels", self_ce)
    for w in args.weights:
        for name, own in (("-CE", self_ce), ("-MSE", self_mse)):
            combined = match + w * spread(match) / spread(own) * own
            report(f"cosine + {w:g} x scaled {name}", combined)
            report(f"cosine + {w:g} x scaled {name}, first 4", combined + first_four)
    if reranker is not None:
        report("log p + 4 x cosine", logp + 4 * match)
        for w in args.weights:
            report(f"log p + 4 x (cosine + {w:g} x scaled -CE)", logp + 4 * (match + w * spread(match) / spread(self_ce) * self_ce))


if __name__ == "__main__":
    main()
