"""Finding the images to caption in what a user points at: files, folders, folders of folders.

`find_images(paths, recursive)` keeps every file it is given (a file named on the command line is attempted even
if it turns out not to be an image, so the user hears why), and looks inside folders by content:

* a file whose header PIL recognises is an image whatever its name; a file with an image extension
  (`.jpg`, `.png`, ...) whose header is not recognised is kept too, so that a broken photo is reported as a
  failure instead of vanishing; any other file is skipped as "not an image";
* hidden files and folders (names starting with ".") are skipped;
* subfolders are entered only with `recursive`, each real folder once (a symbolic link loop is skipped);
* what cannot be read at all (a folder or file without permission, a broken symbolic link) is a failure,
  with its reason.

Skipped entries are counted, failures listed, and nothing is decoded here (only headers are read).
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff")


@dataclass
class Collection:
    images: list[str] = field(default_factory=list)  # paths to caption, in order (folders sorted by name)
    skipped: Counter[str] = field(default_factory=Counter)  # reason -> count ("hidden", "not an image", ...)
    failed: dict[str, str] = field(default_factory=dict)  # path -> why it could not even be listed or opened

    def skipped_summary(self) -> str:
        """'3 not an image, 1 hidden' (empty when nothing was skipped)."""
        return ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items()))


def display_path(path: str | Path) -> str:
    """A path as text that can always be printed: undecodable bytes of a file name appear as \\xNN."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def sniff_image(path: Path) -> bool:
    """True when PIL recognises the header of `path` (nothing is decoded). OSError when it cannot be read."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a huge header is for load_image to refuse, not for us to warn about
            with Image.open(path):
                return True
    except UnidentifiedImageError:
        return False
    except Image.DecompressionBombError:
        return True  # an image, which load_image will refuse with its reason
    except (ValueError, SyntaxError, EOFError):  # header parse errors: a broken file of a known format
        return True
    except OSError as exc:
        if exc.errno is None:  # PIL's own "truncated"/"cannot identify" errors past a known signature
            return True
        raise  # the file system's: permission denied, I/O error


def find_images(paths: Sequence[str | Path], recursive: bool = False) -> Collection:
    """The images to caption in `paths` (see the module docstring), each listed once."""
    found = Collection()
    seen: set[str] = set()
    visited_dirs: set[tuple[int, int]] = set()

    def keep(path: Path) -> None:
        key = os.path.normpath(path)
        if key not in seen:
            seen.add(key)
            found.images.append(str(path))

    def walk(folder: Path) -> None:
        try:
            stat = folder.stat()
            if (stat.st_dev, stat.st_ino) in visited_dirs:
                found.skipped["already visited (symbolic link loop)"] += 1
                return
            visited_dirs.add((stat.st_dev, stat.st_ino))
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            found.failed[str(folder)] = f"cannot list folder ({exc.strerror or exc})"
            return
        for entry in entries:
            path = folder / entry.name
            if entry.name.startswith("."):
                found.skipped["hidden"] += 1
                continue
            try:
                is_dir = entry.is_dir()  # follows symbolic links
                is_file = entry.is_file()
            except OSError as exc:
                found.failed[str(path)] = f"cannot read ({exc.strerror or exc})"
                continue
            if is_dir:
                if recursive:
                    walk(path)
                else:
                    found.skipped["subfolder (use --recursive)"] += 1
                continue
            if not is_file:
                if entry.is_symlink():
                    found.failed[str(path)] = "broken or looping symbolic link"
                else:
                    found.skipped["not a regular file"] += 1
                continue
            try:
                image = sniff_image(path)
            except OSError as exc:
                found.failed[str(path)] = f"cannot read ({exc.strerror or exc})"
                continue
            if image or path.suffix.lower() in IMAGE_SUFFIXES:
                keep(path)
            else:
                found.skipped["not an image"] += 1

    for given in paths:
        path = Path(given)
        if path.is_dir():
            walk(path)
        else:  # named explicitly: attempted, and reported with its reason if it cannot be captioned
            keep(path)
    return found


def unreadable(images: dict[str, Path]) -> dict[str, str]:
    """The images (key -> path) that are missing or whose header is not an image's, with the reason: a check
    of every file's existence and header that costs no decoding (a file broken past its header is found only
    when it is loaded)."""
    bad: dict[str, str] = {}
    for key, path in images.items():
        try:
            if not Path(path).is_file():
                bad[key] = "file does not exist" if not Path(path).exists() else "not a file"
            elif not sniff_image(Path(path)):
                bad[key] = "not a recognised image format"
        except OSError as exc:
            bad[key] = f"cannot read ({exc.strerror or exc})"
    return bad
