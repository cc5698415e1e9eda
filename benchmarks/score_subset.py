"""Score `evaluate --output` files on a slice of the dev images (for example the images a model choice never saw).

    python benchmarks/score_subset.py FILE... [--root ../shared/data/flickr8k] [--split dev] [--start 250] [--stop N]
"""

from __future__ import annotations

import argparse
import json

from diffcap.config import DataConfig
from diffcap.data.prepare import split_records
from diffcap.metrics import score_captions


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+")
    p.add_argument("--root", default="../shared/data/flickr8k")
    p.add_argument("--split", default="dev")
    p.add_argument("--start", type=int, default=250)
    p.add_argument("--stop", type=int, default=None)
    args = p.parse_args()
    records = split_records(DataConfig(root=args.root), args.split)[args.start:args.stop]
    references = {r.key: list(r.captions) for r in records}
    for path in args.files:
        captions = {c["image"]: c["caption"] for c in json.load(open(path))["captions"] if c["image"] in references}
        metrics = score_captions(captions, references, meteor=False).metrics
        print(f"{path}: {len(captions)} images [{args.start}:{args.stop}]",
              " ".join(f"{k} {v:.1f}" for k, v in metrics.items()))


if __name__ == "__main__":
    main()
