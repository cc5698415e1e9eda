"""Sequence-level distillation data: a teacher's captions of the training images become the training captions.

Five references per image describe it in five different ways; a model that decides every word position at once
(diffusion) is pulled between them and drops or mixes words. Training it on one caption per image from an
autoregressive teacher (Kim & Rush 2016; Gu et al. 2018, for non-autoregressive translation) removes that choice:
on Flickr8k dev it moved the diffusion model from CIDEr 31.8 to 36.2 (BENCHMARKS.md).

The teacher's captions come from `diffcap evaluate TEACHER --split train --allow-training-images --output F`;
`teacher_rows` turns them, with the dataset's evaluation split (its own references, untouched), into the rows of
a jsonl dataset. Image keys stay the dataset's, so the feature cache and the leakage fingerprints still apply.

Several caption files of the same images (a model's samples under different seeds, or several teachers) can be
merged by `best_captions`: each training image keeps the caption with the highest CIDEr-D against its own
references, the reward of self-critical training. Training a diffusion model on the best of its own samples
(reward-ranked self-training, as in ReST / RAFT for language models) moves its single sample towards the
best of several without an autoregressive model.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from diffcap.checkpoint import write_text_atomic
from diffcap.data.datasets import DatasetError, ImageRecord
from diffcap.rewards import CiderD


def read_teacher_captions(path: Path) -> dict[str, str]:
    """Image key -> caption from an `evaluate --output` file ({"captions": [{"image", "caption"}, ...]})."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise DatasetError(f"teacher captions {path} not found") from None
    except json.JSONDecodeError as exc:
        raise DatasetError(f"teacher captions {path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    rows = data.get("captions") if isinstance(data, dict) else None
    if not isinstance(rows, list) or not all(isinstance(r, dict) and {"image", "caption"} <= set(r) for r in rows):
        raise DatasetError(f"teacher captions {path}: expected the output of `diffcap evaluate --output`, "
                           '{"captions": [{"image": ..., "caption": ...}, ...]}')
    return {str(r["image"]): str(r["caption"]) for r in rows}


def teacher_rows(train: list[ImageRecord], teacher: Mapping[str, str], evaluation: list[ImageRecord], *,
                 train_split: str = "train", eval_split: str = "dev",
                 keep_references: bool = False) -> list[dict[str, Any]]:
    """jsonl rows: each training image with its teacher caption (first, then its references when
    `keep_references`), each evaluation image with its references."""
    missing = [r.key for r in train if not teacher.get(r.key, "").strip()]
    if missing:
        raise DatasetError(f"the teacher captions lack {len(missing)} of {len(train)} training images (first: "
                           f"{missing[0]}); caption the whole split: diffcap evaluate TEACHER --split {train_split} "
                           "--allow-training-images --output FILE")
    rows = [{"image": r.key, "caption": [teacher[r.key], *r.captions] if keep_references else [teacher[r.key]],
             "split": train_split} for r in train]
    rows += [{"image": r.key, "caption": list(r.captions), "split": eval_split} for r in evaluation]
    return rows


def best_captions(train: list[ImageRecord], sources: list[Mapping[str, str]]) -> tuple[dict[str, str], list[int]]:
    """Each training image's caption with the highest CIDEr-D against its references, among `sources` (image key
    -> caption; ties go to the earlier source), and how many images each source won. An image that a source lacks
    is judged among the others; one that every source lacks is left out (teacher_rows names it)."""
    if not sources:
        raise DatasetError("no caption files to choose from")
    cider = CiderD([list(r.captions) for r in train])
    chosen: dict[str, str] = {}
    wins = [0] * len(sources)
    for i, record in enumerate(train):
        best, best_score = -1, -1.0
        for k, source in enumerate(sources):
            caption = source.get(record.key, "").strip()
            if caption:
                score = cider.score(caption, i)
                if score > best_score:
                    best, best_score = k, score
        if best >= 0:
            chosen[record.key] = sources[best][record.key]
            wins[best] += 1
    return chosen, wins


def image_root(records: list[ImageRecord]) -> Path:
    """The folder that the records' keys are relative to (the jsonl's data.image_root)."""
    roots = {Path(str(r.path)[: -len(r.key)]) if str(r.path).endswith(r.key) else None for r in records}
    if len(roots) != 1 or None in roots:
        raise DatasetError("the images do not share one folder that their keys are relative to; "
                           "write the jsonl by hand with image paths relative to one folder")
    return roots.pop()


def write_jsonl(rows: list[dict[str, Any]], out: Path) -> Path:
    """Write `rows` as JSON Lines, atomically (a killed run leaves the old file or none, never half a file)."""
    return write_text_atomic(Path(out), "".join(json.dumps(r) + "\n" for r in rows))
