"""What self-critical training would learn from: the CIDEr-D (training references and document frequencies, x100)
of an autoregressive model's greedy captions and of its sampled ones at several temperatures, on every N-th
training image (loss.cider_temperature; ABLATIONS.md).

    python benchmarks/sample_temperature.py AR_CHECKPOINT [--root ../shared/data/flickr8k] [--every 60] \
        [--samples 5] [--temperatures 1.0 0.7 0.5 0.3]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from diffcap.config import DataConfig
from diffcap.data.prepare import FeatureTable, default_cache_dir, ensure_features, load_encoder, split_records
from diffcap.pipeline import generate, load_model
from diffcap.rewards import CiderD


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--root", default="../shared/data/flickr8k")
    p.add_argument("--every", type=int, default=60, help="score every N-th training image")
    p.add_argument("--samples", type=int, default=5)
    p.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 0.7, 0.5, 0.3])
    args = p.parse_args()
    torch.manual_seed(0)
    model, meta = load_model(Path(args.checkpoint))
    if not model.autoregressive:
        raise SystemExit(f"{args.checkpoint} is not an autoregressive model")
    records = split_records(DataConfig(root=args.root), "train")
    encoder = load_encoder(model.config.encoder.name)
    cache = ensure_features(encoder, records, default_cache_dir("flickr8k", Path(args.root), encoder.name) / "train")
    records = [r for r in records if r.key in cache]
    table = FeatureTable.from_cache(cache, [r.key for r in records])
    reward = CiderD([r.captions for r in records])
    rows = torch.arange(0, len(records), args.every)
    image = table.batch(rows, "cpu")
    greedy = reward.scores(generate(model, image).captions, rows.tolist())
    print(f"{len(rows)} training images; greedy CIDEr-D {100 * sum(greedy) / len(greedy):.1f}")
    sp, k = model.space, args.samples
    for temperature in args.temperatures:
        ids = model.denoiser.generate(image.repeat(k), end=(sp.sep_index, sp.pad_index), banned=(sp.unk_index,),
                                      sample=True, temperature=temperature)
        captions = sp.decode(ids, model.config.sample.collapse_repeats)
        scores = torch.tensor(reward.scores(captions, rows.repeat(k).tolist())).view(k, -1)
        print(f"temperature {temperature}: sampled {100 * scores.mean():.1f}, best of {k} "
              f"{100 * scores.max(0).values.mean():.1f}, e.g. {captions[1]!r}")


if __name__ == "__main__":
    main()
