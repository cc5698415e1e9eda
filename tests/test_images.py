"""Tests for diffcap.data.images.load_image."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from diffcap.data.images import ImageLoadError, load_image


def _noise(size: tuple[int, int] = (48, 40)) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _encoded(img: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt)
    return buffer.getvalue()


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _bad_files(tmp: Path) -> dict[str, Path]:
    jpg, png = _encoded(_noise(), "JPEG"), _encoded(_noise(), "PNG")
    corrupt_png = bytearray(png)
    middle = len(corrupt_png) // 2
    corrupt_png[middle : middle + 20] = b"\xff" * 20
    corrupt_jpg = bytearray(jpg)
    corrupt_jpg[20:60] = b"\x00" * 40
    return {
        "missing": tmp / "does_not_exist.jpg",
        "text": _write(tmp / "notes.jpg", b"this is not a picture\n"),
        "empty": _write(tmp / "empty.png", b""),
        "truncated_jpeg": _write(tmp / "half.jpg", jpg[: len(jpg) // 2]),
        "truncated_png": _write(tmp / "half.png", png[: len(png) // 2]),
        "corrupt_png": _write(tmp / "broken.png", bytes(corrupt_png)),
        "corrupt_jpeg": _write(tmp / "broken.jpg", bytes(corrupt_jpg)),
    }


@pytest.mark.parametrize(
    "kind",
    ["missing", "text", "empty", "truncated_jpeg", "truncated_png", "corrupt_png", "corrupt_jpeg"],
)
def test_bad_images_raise_image_load_error_naming_the_file(tmp_path: Path, kind: str) -> None:
    path = _bad_files(tmp_path)[kind]
    with pytest.raises(ImageLoadError) as info:
        load_image(path)
    assert path.name in str(info.value)
    assert info.value.reason


def test_truncated_message_says_truncated(tmp_path: Path) -> None:
    with pytest.raises(ImageLoadError, match="truncated"):
        load_image(_bad_files(tmp_path)["truncated_jpeg"])


def _grayscale() -> Image.Image:
    return _noise().convert("L")


def _cmyk() -> Image.Image:
    return Image.open(io.BytesIO(_encoded(_noise().convert("CMYK"), "JPEG")))


def _sixteen_bit() -> Image.Image:
    values = np.linspace(0, 65535, 40 * 48).reshape(40, 48).astype(np.uint16)
    return Image.fromarray(values)  # mode I;16


def _thirty_two_bit() -> Image.Image:
    return _sixteen_bit().convert("I")


def _palette_with_transparency() -> Image.Image:
    img = _noise().convert("P")
    img.info["transparency"] = 0
    return img


@pytest.mark.parametrize(
    ("name", "make"),
    [
        ("gray.png", _grayscale),
        ("bilevel.png", lambda: _noise().convert("1")),
        ("cmyk.jpg", _cmyk),
        ("deep16.png", _sixteen_bit),
        ("deep32.tif", _thirty_two_bit),
        ("alpha.png", lambda: _noise().convert("RGBA")),
        ("gray_alpha.png", lambda: _noise().convert("LA")),
        ("palette.gif", lambda: _noise().convert("P")),
        ("palette_t.png", _palette_with_transparency),
        ("tiny.png", lambda: Image.new("RGB", (1, 1), (10, 20, 30))),
    ],
)
def test_unusual_modes_load_as_rgb(tmp_path: Path, name: str, make) -> None:
    source = make()
    path = tmp_path / name
    source.save(path)
    img = load_image(path)
    assert img.mode == "RGB"
    assert img.size == source.size
    assert load_image(source).mode == "RGB"  # in-memory images are converted too


def test_sixteen_bit_is_scaled_not_clipped(tmp_path: Path) -> None:
    path = tmp_path / "deep.png"
    _sixteen_bit().save(path)
    pixels = np.asarray(load_image(path))
    assert pixels.min() == 0 and pixels.max() == 255
    assert len(np.unique(pixels)) > 200  # a gradient, not a saturated white image


def test_alpha_is_composited_on_white(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    rgba.putpixel((0, 0), (255, 0, 0, 255))  # one opaque red pixel
    path = tmp_path / "alpha.png"
    rgba.save(path)
    pixels = np.asarray(load_image(path))
    assert tuple(pixels[1, 1]) == (255, 255, 255)
    assert tuple(pixels[0, 0]) == (255, 0, 0)


def test_bomb_is_rejected_before_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "big.png"
    _noise((100, 100)).save(path)

    def no_decoding(self):  # pragma: no cover - must not be called
        raise AssertionError("image was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(ImageLoadError, match="decompression bomb") as info:
        load_image(path, max_pixels=100 * 100 - 1)
    assert "big.png" in str(info.value)


def test_pil_decompression_bomb_error_is_wrapped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "big.png"
    _noise((100, 100)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL refuses > 2000 pixels itself
    with pytest.raises(ImageLoadError, match="big.png"):
        load_image(path)


def test_image_at_the_limit_loads(tmp_path: Path) -> None:
    path = tmp_path / "ok.png"
    _noise((10, 10)).save(path)
    assert load_image(path, max_pixels=100).size == (10, 10)
