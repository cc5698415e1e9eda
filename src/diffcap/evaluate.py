"""Caption a split and score it with pycocoevalcap against all references of each image."""

from __future__ import annotations

import time
from typing import Any

import torch
from tqdm.auto import tqdm

from diffcap.data.datasets import ImageRecord
from diffcap.data.prepare import FeatureTable
from diffcap.metrics import score_captions
from diffcap.pipeline import CaptionModel, generate


def caption_table(model: CaptionModel, table: FeatureTable, *, batch_size: int = 64, progress: bool = True,
                  desc: str = "captioning", **options: Any) -> list[str]:
    """One caption per row of `table`, in batches."""
    device = next(model.denoiser.parameters()).device
    captions: list[str] = []
    bar = tqdm(total=len(table.keys), desc=desc, unit="img", disable=not progress, leave=False)
    for start in range(0, len(table.keys), batch_size):
        rows = torch.arange(start, min(start + batch_size, len(table.keys)))
        captions += generate(model, table.batch(rows, device), first_index=start, **options).captions
        bar.update(len(rows))
    bar.close()
    return captions


def evaluate_records(model: CaptionModel, records: list[ImageRecord], table: FeatureTable, *, meteor: bool = True,
                     batch_size: int = 64, progress: bool = True, **options: Any) -> dict[str, Any]:
    """{"metrics", "unavailable", "captions", "num_images", "seconds", "captions_per_second"} for `records`."""
    if [r.key for r in records] != table.keys:
        raise ValueError("records and feature table must list the same images in the same order")
    start = time.perf_counter()
    captions = caption_table(model, table, batch_size=batch_size, progress=progress, **options)
    seconds = time.perf_counter() - start
    hypotheses = {r.key: c for r, c in zip(records, captions)}
    references = {r.key: list(r.captions) for r in records}
    report = score_captions(hypotheses, references, meteor=meteor)
    return {
        "metrics": report.metrics,
        "unavailable": report.unavailable,
        "captions": [{"image": r.key, "caption": c} for r, c in zip(records, captions)],
        "num_images": len(records),
        "seconds": round(seconds, 2),
        "captions_per_second": round(len(records) / max(seconds, 1e-9), 2),
    }
