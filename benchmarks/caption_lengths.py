"""How much "padding to the longest caption in a batch" could save: the word-piece lengths of the training
captions (with [SEP], capped at text.max_length) and the longest caption of random training batches.

    python benchmarks/caption_lengths.py [--root ../shared/data/flickr8k] [--batch 64] [--max-length 24]
"""

from __future__ import annotations

import argparse
import random
import statistics

from diffcap.config import DataConfig
from diffcap.data.prepare import split_records
from diffcap.text.space import load_tokenizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default="../shared/data/flickr8k")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--max-length", type=int, default=24)
    p.add_argument("--backbone", default="minilm")
    p.add_argument("--batches", type=int, default=2000, help="random batches drawn")
    args = p.parse_args()
    captions = [c for r in split_records(DataConfig(root=args.root), "train") for c in r.captions]
    pieces = load_tokenizer(args.backbone)(captions, add_special_tokens=False)["input_ids"]
    lengths = sorted(min(len(ids) + 1, args.max_length) for ids in pieces)  # + [SEP], as TextSpace.encode
    print(f"{len(lengths)} captions: mean {statistics.mean(lengths):.1f} positions, median "
          f"{lengths[len(lengths) // 2]}, 95th percentile {lengths[int(0.95 * len(lengths))]}, "
          f"{sum(n >= args.max_length for n in lengths) / len(lengths):.1%} at the cap of {args.max_length}")
    rng = random.Random(0)
    longest = [max(rng.sample(lengths, args.batch)) for _ in range(args.batches)]
    print(f"longest caption of a random batch of {args.batch}: mean {statistics.mean(longest):.1f}, min "
          f"{min(longest)}; {sum(n == args.max_length for n in longest) / len(longest):.0%} of batches reach the cap")


if __name__ == "__main__":
    main()
