"""Any BERT-family backbone by id or directory: here a tiny random DistilBERT saved locally (no hub)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diffcap.config import Config
from diffcap.pipeline import build_model
from diffcap.text.space import TextSpaceError, load_backbone, resolve_backbone


@pytest.fixture(scope="module")
def tiny_distilbert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import AutoTokenizer, DistilBertConfig, DistilBertModel

    directory = tmp_path_factory.mktemp("distilbert")
    tokenizer = AutoTokenizer.from_pretrained(resolve_backbone("minilm"))  # the same uncased WordPiece vocabulary
    config = DistilBertConfig(vocab_size=tokenizer.vocab_size, dim=32, n_layers=2, n_heads=4, hidden_dim=37,
                              max_position_embeddings=64)
    torch.manual_seed(0)
    DistilBertModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_distilbert_directory_builds_a_working_model(tiny_distilbert: Path) -> None:
    config = Config()
    config.text.backbone = str(tiny_distilbert)
    config.text.max_length = 10
    config.model.layers = 2
    config.model.grid_pool = 1
    captions = ["a dog runs on the grass", "two men play football"]
    model = build_model(config, pooled_dim=8, grid_dim=8, captions=captions)
    assert model.space.dim == 32 and model.denoiser.shape.hidden == 32
    ids = model.space.encode(captions)
    assert model.space.decode(model.space.round(model.space.embed(ids))) == captions
    # the denoiser's blocks are the backbone's layers
    _, backbone = load_backbone(str(tiny_distilbert))
    theirs = backbone.state_dict()["transformer.layer.1.ffn.lin2.weight"]
    assert torch.equal(model.denoiser.blocks[1].ff_out.weight, theirs)


def test_unknown_backbone_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TextSpaceError, match="cannot load text backbone"):
        load_backbone(str(tmp_path / "no-such-model"))
