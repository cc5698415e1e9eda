"""Readers for image-caption datasets.

Every reader returns :class:`ImageRecord` objects, one per image, holding all captions of that image. Splits are
always made *by image*: an image (and so all of its captions) belongs to exactly one split, and the readers refuse
data in which one image appears in two splits.

Supported layouts (``kind``):

``flickr8k``
    The official Flickr8k layout. ``root`` holds an images folder (``images/``, ``Flickr8k_Dataset/`` or
    ``Flicker8k_Dataset/``, possibly nested as ``Flickr8k_Dataset/Flicker8k_Dataset/``) and the text files
    ``Flickr8k.token.txt`` (``<image>.jpg#<n><TAB><caption>``) and ``Flickr_8k.{train,dev,test}Images.txt`` (one
    image file name a line). The text files may instead sit in a ``Flickr8k_text/`` subfolder. A split whose list
    file is missing is unavailable. Images with captions but in no split list are ignored.
``karpathy``
    Karpathy's ``dataset_coco.json`` / ``dataset_flickr8k.json`` / ``dataset_flickr30k.json`` format. Split names
    are mapped to diffcap's: ``train`` -> train, ``restval`` -> train (Karpathy's convention of training on the
    rest of the COCO val2014 images), ``val`` -> dev, ``test`` -> test. The image key is ``filepath/filename``
    (or ``filename`` when the entry has no ``filepath``), relative to the image root.
``jsonl`` / ``csv``
    One caption a row with an ``image`` path (relative to the image root; an absolute path is used as it is) and
    a ``caption``; in JSON Lines ``caption`` may also be a list of captions. An optional ``split`` column/key
    names the split of each row (``val``/``valid``/``validation`` are read as ``dev``). **Without a split
    column, all rows form the split "train".** Rows of the same image are grouped into one record.

For ``karpathy``, ``jsonl`` and ``csv``, ``annotations`` is the annotation file; by default it is the single
matching file in ``root`` (``dataset_*.json``, ``*.jsonl``, ``*.csv``). ``root`` may also be the annotation file
itself, in which case its folder is the root. The image root is ``image_root`` when given, else the images folder
(flickr8k) or ``root``.

Text files are read as UTF-8 (a byte-order mark is allowed, Windows line endings are fine). Blank lines are
skipped; captions are stripped of surrounding whitespace but keep their case. Problems that make the data
unusable raise :class:`DatasetError`; recoverable ones (empty captions, images without captions or without an
image file) drop the affected items and log one warning each on the ``"diffcap"`` logger.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

__all__ = [
    "DATASET_KINDS",
    "DatasetError",
    "ImageRecord",
    "available_splits",
    "check_no_leakage",
    "load_all",
    "load_split",
]

log = logging.getLogger("diffcap")

DATASET_KINDS = ("flickr8k", "karpathy", "jsonl", "csv")

#: Canonical split order, used to sort split names.
_SPLIT_ORDER = ("train", "dev", "test")
#: Split names in annotation files that mean one of diffcap's split names.
_SPLIT_ALIASES = {"val": "dev", "valid": "dev", "validation": "dev", "restval": "train"}
#: How many example names a warning or error shows.
_SHOW = 5


class DatasetError(Exception):
    """The dataset cannot be read: the message names the file (and line) at fault and what to do about it."""


@dataclass(frozen=True)
class ImageRecord:
    """One image and all of its captions.

    Attributes:
        key: Stable image id, used as the feature-cache key: the path relative to the image root
            (e.g. ``"1000268201_693b08cb0e.jpg"``).
        path: Absolute path of the image file.
        captions: The image's captions, stripped of surrounding whitespace, in file order.
    """

    key: str
    path: Path
    captions: tuple[str, ...]


# --------------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------------


def available_splits(kind: str, root: Path) -> list[str]:
    """Names of the splits that ``root`` provides for dataset ``kind`` (train, dev, test first)."""
    _check_kind(kind)
    root = Path(root)
    if kind == "flickr8k":
        return _Flickr8kLayout(root).available_splits()
    return list(_read_source(kind, root, None, None).splits)


def load_split(
    kind: str,
    root: Path,
    split: str,
    *,
    image_root: Path | None = None,
    annotations: Path | None = None,
    keep_missing: bool = False,
) -> list[ImageRecord]:
    """Read one split of a dataset.

    Args:
        kind: One of :data:`DATASET_KINDS`.
        root: Dataset folder (or, for karpathy/jsonl/csv, the annotation file).
        split: Split name, e.g. ``"train"``, ``"dev"`` or ``"test"``.
        image_root: Folder the image keys are relative to (default: see the module docstring).
        annotations: Annotation file for karpathy/jsonl/csv (default: the single matching file in ``root``).
        keep_missing: Keep the images whose file is missing (for a caller that reports them itself, as
            ``diffcap evaluate`` does) instead of dropping them with a warning.

    Returns:
        One record per image that has at least one caption and an image file (or any, with ``keep_missing``),
        in file order.

    Raises:
        DatasetError: The split is not available, has no usable images, or the files are malformed.
    """
    source = _read_source(kind, Path(root), image_root, annotations)
    if split not in source.splits:
        raise DatasetError(
            f"split '{split}' is not available in {source.location}: {source.why_absent(split)}; "
            f"available: {', '.join(source.splits) or 'none'}"
        )
    return _build_records(split, source.splits[split], source.image_root(), source.location, keep_missing)


def load_all(
    kind: str,
    root: Path,
    *,
    image_root: Path | None = None,
    annotations: Path | None = None,
) -> dict[str, list[ImageRecord]]:
    """Read every available split (arguments as for :func:`load_split`) and check that no image is in two."""
    source = _read_source(kind, Path(root), image_root, annotations)
    if not source.splits:
        raise DatasetError(f"no split is available in {source.location}: {source.why_absent('train')}")
    folder = source.image_root()
    splits = {name: _build_records(name, captions, folder, source.location) for name, captions in source.splits.items()}
    check_no_leakage(splits)
    return splits


def check_no_leakage(splits: Mapping[str, Iterable[ImageRecord]]) -> None:
    """Raise :class:`DatasetError` if an image key, or the same image file, occurs in two splits."""
    for label, key_of in (("image", lambda r: r.key), ("image file", lambda r: str(r.path.resolve()))):
        clashes = _shared_keys({name: (key_of(r) for r in records) for name, records in splits.items()})
        if clashes:
            raise DatasetError(
                f"{len(clashes)} {label}(s) occur in more than one split, e.g. "
                + "; ".join(f"{key} in '{a}' and '{b}'" for key, a, b in clashes[:_SHOW])
                + ". Splits must be made by image: keep every image (with all its captions) in one split."
            )


# --------------------------------------------------------------------------------------------------------------
# Captions grouped by split, before the image files are looked at
# --------------------------------------------------------------------------------------------------------------


@dataclass
class _Source:
    """What a reader found: captions by split and image key, plus how to explain absent splits.

    Attributes:
        location: The dataset root (or file) used in messages.
        splits: ``split -> image key -> captions``, splits in canonical order, keys in file order.
        image_root: Returns the folder the keys are relative to (a callable, since finding it may fail and only
            matters once records are built).
        absent: Reasons why known split names are absent, e.g. ``{"test": "Flickr_8k.testImages.txt not found"}``.
        default_absent: Reason used for split names not in ``absent``.
    """

    location: Path
    splits: dict[str, dict[str, list[str]]]
    image_root: Callable[[], Path]
    absent: dict[str, str] = field(default_factory=dict)
    default_absent: str = "no image belongs to it"

    def why_absent(self, split: str) -> str:
        return self.absent.get(split, self.default_absent)


def _read_source(kind: str, root: Path, image_root: Path | None, annotations: Path | None) -> _Source:
    """Run the reader for ``kind`` and check that its splits share no image key."""
    _check_kind(kind)
    if kind == "flickr8k":
        source = _Flickr8kLayout(root, image_root).read()
    else:
        file, root = _annotation_file(kind, root, annotations)
        folder = Path(image_root) if image_root is not None else root
        readers = {"karpathy": _read_karpathy, "jsonl": _read_jsonl, "csv": _read_csv}
        splits, absent, default_absent = readers[kind](file)
        source = _Source(file, _ordered(splits), lambda: _existing_dir(folder, "image root"), absent, default_absent)
    clashes = _shared_keys({name: captions.keys() for name, captions in source.splits.items()})
    if clashes:
        raise DatasetError(
            f"{source.location}: {len(clashes)} image(s) are in more than one split, e.g. "
            + "; ".join(f"{key} in '{a}' and '{b}'" for key, a, b in clashes[:_SHOW])
            + ". Splits must be made by image: put every image in exactly one split."
        )
    return source


def _build_records(split: str, captions: Mapping[str, list[str]], image_root: Path, location: Path,
                   keep_missing: bool = False) -> list[ImageRecord]:
    """Turn ``key -> captions`` into records, dropping images without captions or (unless ``keep_missing``)
    without an image file."""
    records: list[ImageRecord] = []
    uncaptioned: list[str] = []
    missing: list[str] = []
    for key, texts in captions.items():
        path = (image_root / key).absolute()
        if not texts:
            uncaptioned.append(key)
        elif not keep_missing and not path.is_file():
            missing.append(key)
        else:
            records.append(ImageRecord(key=key, path=path, captions=tuple(texts)))
    if uncaptioned:
        log.warning(
            "split '%s' of %s: dropped %d image(s) that have no caption: %s",
            split, location, len(uncaptioned), _examples(uncaptioned),
        )
    if missing:
        log.warning(
            "split '%s' of %s: dropped %d image(s) whose file is not under %s: %s",
            split, location, len(missing), image_root, _examples(missing),
        )
    if not records:
        raise DatasetError(
            f"split '{split}' has no images with captions ({location}: {len(captions)} image(s) listed, "
            f"{len(uncaptioned)} without caption, {len(missing)} without an image file under {image_root}); "
            "check the split's annotation and the image folder"
        )
    return records


# --------------------------------------------------------------------------------------------------------------
# flickr8k
# --------------------------------------------------------------------------------------------------------------

_F8K_TOKENS = "Flickr8k.token.txt"
_F8K_LISTS = {name: f"Flickr_8k.{name}Images.txt" for name in _SPLIT_ORDER}
_F8K_TEXT_DIRS = (".", "Flickr8k_text")
#: Image folders tried in order (nested ones first: the official zip may unpack to a folder inside a folder).
_F8K_IMAGE_DIRS = (
    "Flickr8k_Dataset/Flicker8k_Dataset",
    "Flickr8k_Dataset/Flickr8k_Dataset",
    "images",
    "Flickr8k_Dataset",
    "Flicker8k_Dataset",
)


class _Flickr8kLayout:
    """Finds and reads the files of the official Flickr8k layout."""

    def __init__(self, root: Path, image_root: Path | None = None) -> None:
        self.root = _existing_dir(Path(root), "Flickr8k root")
        self._image_root = None if image_root is None else Path(image_root)
        self.text_dir = self._find_text_dir()

    def _find_text_dir(self) -> Path:
        for name in _F8K_TEXT_DIRS:
            folder = self.root / name
            if (folder / _F8K_TOKENS).is_file() or any((folder / f).is_file() for f in _F8K_LISTS.values()):
                return folder
        raise DatasetError(
            f"{self.root} is not a Flickr8k folder: {_F8K_TOKENS} and the Flickr_8k.*Images.txt split lists were "
            f"found neither there nor in {self.root / 'Flickr8k_text'}"
        )

    def available_splits(self) -> list[str]:
        return [name for name, file in _F8K_LISTS.items() if (self.text_dir / file).is_file()]

    def image_root(self) -> Path:
        if self._image_root is not None:
            return _existing_dir(self._image_root, "image root")
        for name in _F8K_IMAGE_DIRS:
            if (self.root / name).is_dir():
                return self.root / name
        raise DatasetError(
            f"no Flickr8k images folder in {self.root}: looked for {', '.join(_F8K_IMAGE_DIRS)}; "
            "move the images there or pass image_root"
        )

    def read(self) -> _Source:
        token_file = self.text_dir / _F8K_TOKENS
        captions = _read_flickr8k_tokens(token_file)
        splits: dict[str, dict[str, list[str]]] = {}
        absent: dict[str, str] = {}
        for name, file in _F8K_LISTS.items():
            path = self.text_dir / file
            if not path.is_file():
                absent[name] = f"{file} not found"
                continue
            names = [line.strip() for _, line in _read_lines(path) if line.strip()]
            splits[name] = {key: captions.get(key, []) for key in names}  # dict keeps order and drops repeats
        return _Source(self.root, splits, self.image_root, absent, "Flickr8k only has train, dev and test splits")


def _read_flickr8k_tokens(path: Path) -> dict[str, list[str]]:
    """Read ``<image>#<n><TAB><caption>`` lines into ``image -> captions``."""
    captions: dict[str, list[str]] = {}
    empty = _EmptyCaptions(path)
    for number, line in _read_lines(path):
        if not line.strip():
            continue
        if "\t" not in line:
            raise DatasetError(
                f"{path}:{number}: expected '<image>#<n><TAB><caption>' but the line has no tab: {line[:80]!r}; "
                "fix or delete the line"
            )
        image_id, caption = line.split("\t", 1)
        key = image_id.strip().rpartition("#")[0] or image_id.strip()
        if not key:
            raise DatasetError(f"{path}:{number}: the image name before the tab is empty; fix or delete the line")
        caption = caption.strip()
        if not caption:
            empty.add(number)
            continue
        captions.setdefault(key, []).append(caption)
    empty.report()
    return captions


# --------------------------------------------------------------------------------------------------------------
# karpathy, jsonl, csv
# --------------------------------------------------------------------------------------------------------------

_Splits = dict[str, dict[str, list[str]]]
_ANNOTATION_PATTERNS = {"karpathy": "dataset_*.json", "jsonl": "*.jsonl", "csv": "*.csv"}


def _annotation_file(kind: str, root: Path, annotations: Path | None) -> tuple[Path, Path]:
    """Return ``(annotation file, dataset root)``; ``root`` may itself be the annotation file."""
    if annotations is None and root.is_file():
        annotations, root = root, root.parent
    root = _existing_dir(root, "dataset root")
    if annotations is not None:
        annotations = Path(annotations)
        if not annotations.is_file():
            raise DatasetError(f"annotation file {annotations} not found; pass an existing file as annotations")
        return annotations, root
    pattern = _ANNOTATION_PATTERNS[kind]
    found = sorted(root.glob(pattern))
    if len(found) != 1:
        what = "no" if not found else f"{len(found)} ({', '.join(p.name for p in found)})"
        raise DatasetError(f"{root}: found {what} files matching {pattern}; pass the one to use as annotations")
    return found[0], root


def _read_karpathy(path: Path) -> tuple[_Splits, dict[str, str], str]:
    """Read a Karpathy ``dataset_*.json`` file; ``val`` becomes dev and ``restval`` joins train."""
    text = "\n".join(line for _, line in _read_lines(path))
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise DatasetError(f"{path}:{error.lineno}: not valid JSON ({error.msg}, column {error.colno})") from None
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise DatasetError(f"{path}: expected a JSON object with an 'images' list (Karpathy's dataset_*.json format)")
    splits: _Splits = {}
    empty = _EmptyCaptions(path, where="sentence")
    for index, image in enumerate(images):
        if not isinstance(image, dict) or not isinstance(image.get("filename"), str):
            raise DatasetError(f"{path}: images[{index}] has no 'filename' string; fix the entry")
        raw_split = image.get("split")
        split = _SPLIT_ALIASES.get(raw_split, raw_split)
        if split not in _SPLIT_ORDER:
            raise DatasetError(
                f"{path}: images[{index}] ({image['filename']}) has split {raw_split!r}; "
                "expected train, restval, val or test"
            )
        key = _clean_key(f"{image['filepath']}/{image['filename']}" if image.get("filepath") else image["filename"])
        captions = splits.setdefault(split, {}).setdefault(key, [])
        for number, sentence in enumerate(image.get("sentences") or []):
            caption = _karpathy_caption(sentence).strip()
            if caption:
                captions.append(caption)
            else:
                empty.add(f"images[{index}].sentences[{number}]")
    empty.report()
    absent = {name: f"no image in {path.name} has split {name!r}" for name in _SPLIT_ORDER}
    absent["dev"] = f"no image in {path.name} has split 'val'"
    return splits, absent, "Karpathy files only have train, dev (val) and test splits"


def _karpathy_caption(sentence: object) -> str:
    """The ``raw`` text of a Karpathy sentence entry, or its joined ``tokens`` when there is no ``raw``."""
    if isinstance(sentence, dict):
        if isinstance(sentence.get("raw"), str):
            return sentence["raw"]
        if isinstance(sentence.get("tokens"), list):
            return " ".join(str(token) for token in sentence["tokens"])
    return ""


class _RowGrouper:
    """Groups caption rows into ``split -> image key -> captions`` for the jsonl and csv readers."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.splits: _Splits = {}
        self.has_split_column: bool | None = None
        self.empty = _EmptyCaptions(path)

    def add(self, line: int, image: object, captions: list[object], split: object | None) -> None:
        if not isinstance(image, str) or not image.strip():
            raise DatasetError(f"{self.path}:{line}: the 'image' value is missing or empty; fix or delete the row")
        with_split = split is not None and split != ""
        if self.has_split_column is None:
            self.has_split_column = with_split
        elif with_split != self.has_split_column:
            raise DatasetError(
                f"{self.path}:{line}: this row {'has' if with_split else 'lacks'} a 'split' value but the first row "
                f"{'does not' if with_split else 'has one'}; give every row a split, or none (all rows are train)"
            )
        name = str(split).strip() if with_split else "train"
        name = _SPLIT_ALIASES.get(name.lower(), name)
        texts = self.splits.setdefault(name, {}).setdefault(_clean_key(image), [])
        for caption in captions:
            if not isinstance(caption, str):
                raise DatasetError(f"{self.path}:{line}: 'caption' must be a string (or a list of strings)")
            if caption.strip():
                texts.append(caption.strip())
            else:
                self.empty.add(line)

    def result(self) -> tuple[_Splits, dict[str, str], str]:
        self.empty.report()
        if self.has_split_column:
            reason = f"no row of {self.path.name} has that split"
        else:
            reason = f"{self.path.name} has no split column, so all its rows form split 'train'"
        return self.splits, {}, reason


def _read_jsonl(path: Path) -> tuple[_Splits, dict[str, str], str]:
    """Read JSON Lines rows ``{"image": ..., "caption": ..., "split"?: ...}``."""
    rows = _RowGrouper(path)
    for number, line in _read_lines(path):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DatasetError(f"{path}:{number}: not valid JSON ({error.msg}, column {error.colno})") from None
        if not isinstance(row, dict) or "image" not in row or "caption" not in row:
            raise DatasetError(f"{path}:{number}: expected a JSON object with 'image' and 'caption' keys")
        caption = row["caption"]
        rows.add(number, row["image"], caption if isinstance(caption, list) else [caption], row.get("split"))
    return rows.result()


def _read_csv(path: Path) -> tuple[_Splits, dict[str, str], str]:
    """Read a comma-separated file with a header naming the columns ``image``, ``caption`` and optionally ``split``."""
    text = "\n".join(line for _, line in _read_lines(path))
    reader = csv.DictReader(io.StringIO(text, newline=""))
    columns = [name.strip() for name in reader.fieldnames or []]
    if "image" not in columns or "caption" not in columns:
        raise DatasetError(
            f"{path}:1: the header must name the columns 'image' and 'caption' (and optionally 'split'); "
            f"found {columns}"
        )
    reader.fieldnames = columns
    rows = _RowGrouper(path)
    for row in reader:
        values = {name: (value or "").strip() if isinstance(value, str) else "" for name, value in row.items()}
        if not any(values.values()):
            continue
        split = values.get("split") if "split" in columns else None
        rows.add(reader.line_num, values["image"], [values["caption"]], split)
    return rows.result()


# --------------------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------------------


class _EmptyCaptions:
    """Counts skipped empty captions of one file and logs a single warning about them."""

    def __init__(self, path: Path, where: str = "line") -> None:
        self.path = path
        self.where = where
        self.places: list[object] = []

    def add(self, place: object) -> None:
        self.places.append(place)

    def report(self) -> None:
        if self.places:
            log.warning(
                "%s: skipped %d empty caption(s) (%s %s)",
                self.path, len(self.places), self.where, _examples([str(p) for p in self.places]),
            )


def _read_lines(path: Path) -> list[tuple[int, str]]:
    """Read a UTF-8 text file (BOM and CRLF tolerated) as ``(1-based line number, line)`` pairs."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise DatasetError(f"{path} not found; check the dataset root and file names") from None
    except OSError as error:
        raise DatasetError(f"cannot read {path}: {error.strerror or error}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise DatasetError(
            f"{path}:{line}: not valid UTF-8 (byte 0x{data[error.start]:02x}); re-save the file as UTF-8 "
            "or delete the line"
        ) from None
    return [(number, line.rstrip("\r")) for number, line in enumerate(text.split("\n"), start=1)]


def _existing_dir(path: Path, what: str) -> Path:
    if not path.exists():
        raise DatasetError(f"{what} {path} does not exist; check the path")
    if not path.is_dir():
        raise DatasetError(f"{what} {path} is not a folder")
    return path


def _check_kind(kind: str) -> None:
    if kind not in DATASET_KINDS:
        raise DatasetError(f"unknown dataset kind {kind!r}; choose one of {', '.join(DATASET_KINDS)}")


def _clean_key(image: str) -> str:
    """Normalise an image path to a key: forward slashes, no ``./`` parts, no surrounding blanks."""
    return PurePosixPath(image.strip()).as_posix()


def _ordered(splits: _Splits) -> _Splits:
    """Sort splits as train, dev, test, then any other names alphabetically."""
    rank = {name: i for i, name in enumerate(_SPLIT_ORDER)}
    return {name: splits[name] for name in sorted(splits, key=lambda n: (rank.get(n, len(rank)), n))}


def _shared_keys(keys_by_split: Mapping[str, Iterable[str]]) -> list[tuple[str, str, str]]:
    """``(key, first split, second split)`` for every key that occurs in two splits."""
    seen: dict[str, str] = {}
    clashes: list[tuple[str, str, str]] = []
    for name, keys in keys_by_split.items():
        for key in set(keys):
            if key in seen and seen[key] != name:
                clashes.append((key, seen[key], name))
            else:
                seen.setdefault(key, name)
    return sorted(clashes)


def _examples(names: list[str]) -> str:
    shown = ", ".join(names[:_SHOW])
    return shown + (f", ... ({len(names) - _SHOW} more)" if len(names) > _SHOW else "")
