"""Safe image loading.

:func:`load_image` turns a path (or an already opened PIL image) into an RGB
``PIL.Image.Image`` and converts every failure into an :class:`ImageLoadError`
whose message names the file and the reason, instead of a bare PIL traceback.

* Missing files, non-image files, truncated or corrupt JPEG/PNG files are
  rejected (``img.load()`` runs inside the ``try`` so truncation is detected).
* Decompression bombs (``width * height > max_pixels``) are rejected from the
  header alone, before any pixel is decoded.
* Unusual but valid modes are converted, not rejected: grayscale, 1-bit, CMYK,
  16/32-bit integer and float images, palette images, and images with an alpha
  channel (composited on a white background).
* The EXIF orientation tag is applied, so photos are upright.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

DEFAULT_MAX_PIXELS = 50_000_000

# Modes that carry transparency and are composited on white.
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
# Integer/float modes with more than 8 bits per sample.
_HIGH_DEPTH_MODES = frozenset({"I", "F"})


class ImageLoadError(Exception):
    """An image could not be loaded; the message names the file and the reason."""

    def __init__(self, source: str | Path, reason: str) -> None:
        self.source = str(source)
        self.reason = reason
        super().__init__(f"cannot load image {self.source!r}: {reason}")


def load_image(
    source: str | Path | Image.Image, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """Load ``source`` as an RGB image.

    Args:
        source: a file path, or an already opened PIL image (converted only).
        max_pixels: images with more pixels than this are rejected before decoding.

    Raises:
        ImageLoadError: the file is missing, unreadable, not an image, truncated,
            corrupt, or too large.
    """
    if isinstance(source, Image.Image):
        try:
            return to_rgb(source)
        except Exception as exc:  # noqa: BLE001 - any PIL failure becomes ImageLoadError
            raise ImageLoadError("<in-memory image>", _describe(exc)) from exc

    path = Path(source)
    if not path.exists():
        raise ImageLoadError(path, "file does not exist")
    if not path.is_file():
        raise ImageLoadError(path, "not a regular file")
    try:
        with warnings.catch_warnings():
            # We apply our own pixel limit below; silence PIL's generic warning.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height = img.size  # header only, nothing decoded yet
                if width * height > max_pixels:
                    raise ImageLoadError(path, _bomb_reason(width, height, max_pixels))
                img.load()  # decodes; raises on truncated or corrupt data
                return to_rgb(img)
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(path, f"decompression bomb rejected by PIL ({exc})") from exc
    except Image.UnidentifiedImageError as exc:
        raise ImageLoadError(path, "not a recognised image format") from exc
    except Exception as exc:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, ...
        raise ImageLoadError(path, _describe(exc)) from exc


def to_rgb(img: Image.Image) -> Image.Image:
    """Return an upright RGB copy of ``img`` (alpha composited on white)."""
    img = ImageOps.exif_transpose(img)  # returns a copy
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode in _HIGH_DEPTH_MODES:
        return _high_depth_to_rgb(img)
    if mode == "P" and "transparency" in img.info:
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _high_depth_to_rgb(img: Image.Image) -> Image.Image:
    """Scale a 16/32-bit integer or float single-channel image to 8-bit RGB.

    ``I;16*`` images use the full 16-bit range; ``I``/``F`` images are kept as
    is if they fit in 0..255, scaled as 16-bit data if they fit in 0..65535,
    and min-max normalised otherwise.
    """
    values = np.asarray(img, dtype=np.float64)  # (H, W)
    if img.mode.startswith("I;16"):
        values = values / 65535.0 * 255.0
    else:
        lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if lo >= 0 and hi <= 255:
            pass
        elif lo >= 0 and hi <= 65535:
            values = values / 65535.0 * 255.0
        else:
            values = (values - lo) / max(hi - lo, 1e-12) * 255.0
    gray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return Image.fromarray(gray).convert("RGB")


def _bomb_reason(width: int, height: int, max_pixels: int) -> str:
    return (
        f"image is {width}x{height} = {width * height:,} pixels, more than the "
        f"limit of {max_pixels:,} (possible decompression bomb); not decoded"
    )


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    if "truncated" in text.lower():
        return f"truncated file ({text})"
    return f"corrupt or unreadable image ({type(exc).__name__}: {text or 'no details'})"
