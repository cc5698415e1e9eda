"""Caption files: `diffcap caption --output captions.jsonl|.csv|.json`, written atomically and resumable.

While a run goes on, each record (a JSON object: "path", "caption", and what --trajectory/--candidates add) is
appended to `<output>.partial` as one JSON line and flushed to disk after every batch, so a killed run loses at
most the batch in flight. When the run ends, the output is written in its format from those lines to a temporary
file that replaces `<output>` in one rename, and the .partial file is removed: `<output>` is either the previous
complete file or the new complete one, never half written.

`resume=True` reads the records of an existing `<output>` and `<output>.partial` (a torn last line of a killed
run is ignored), and `done` tells the caller which paths to skip; the final file holds each path once. Without
`resume`, a leftover .partial file is refused (it is an interrupted run's work) rather than overwritten.

JSON is written with ASCII escapes, so file names that are not valid UTF-8 round-trip exactly; CSV keeps them
as their raw bytes.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from diffcap.checkpoint import write_text_atomic

FORMATS = (".jsonl", ".csv", ".json")


class OutputError(ValueError):
    """The output file cannot be used as asked; the message says why and what to do."""


def output_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise OutputError(f"--output {path}: unknown format {suffix or '(no extension)'!r}; "
                          f"use a file ending in {', '.join(FORMATS)}")
    return suffix


class CaptionFile:
    def __init__(self, path: Path, *, resume: bool = False) -> None:
        self.path = Path(path)
        self.format = output_format(self.path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        if self.path.is_dir():
            raise OutputError(f"--output {self.path} is a directory; give a file name")
        if not self.path.parent.is_dir():
            raise OutputError(f"--output {self.path}: folder {self.path.parent} does not exist")
        if self.partial.exists() and not resume:
            raise OutputError(f"{self.partial} holds an interrupted run's captions: add --resume to continue it, "
                              "or delete it to start over")
        records: dict[str, dict[str, Any]] = {}
        if resume:
            for record in (*read_records(self.path), *_read_jsonl(self.partial)):
                records.setdefault(record["path"], record)
        self.done = set(records)
        # the partial file starts as exactly the records kept (a torn line dropped), then grows
        write_text_atomic(self.partial, "".join(_json_line(r) for r in records.values()))
        self._file: TextIO | None = open(self.partial, "a", encoding="ascii")

    def add(self, records: list[dict[str, Any]]) -> None:
        """Append records (one batch) and flush them to disk."""
        assert self._file is not None, "CaptionFile already finished"
        for record in records:
            if record["path"] not in self.done:
                self.done.add(record["path"])
                self._file.write(_json_line(record))
        self._file.flush()
        os.fsync(self._file.fileno())

    def finish(self) -> int:
        """Write the output in its format (atomically) and remove the .partial file; the number of records."""
        self.close()
        records = list(_read_jsonl(self.partial))
        write_text_atomic(self.path, render(records, self.format))
        self.partial.unlink()
        return len(records)

    def close(self) -> None:
        """Stop writing, keeping the .partial file (an interrupted run: --resume continues it)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> CaptionFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def render(records: list[dict[str, Any]], fmt: str) -> str:
    if fmt == ".jsonl":
        return "".join(_json_line(r) for r in records)
    if fmt == ".json":
        return json.dumps(records, indent=1) + "\n"
    columns = ["path", "caption"] + sorted({k for r in records for k in r} - {"path", "caption"})
    out = io.StringIO()
    writer = csv.DictWriter(out, columns, lineterminator="\n")
    writer.writeheader()
    for record in records:  # lists (candidates, trajectory) as JSON text in their cell
        writer.writerow({k: v if isinstance(v, str) else json.dumps(v) for k, v in record.items()})
    return out.getvalue()


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a finished output file (empty if it does not exist)."""
    if not path.is_file():
        return []
    fmt = output_format(path)
    if fmt == ".jsonl":
        return list(_read_jsonl(path))
    text = path.read_text(encoding="utf-8", errors="surrogateescape")
    try:
        if fmt == ".json":
            records = json.loads(text)
            if not isinstance(records, list):
                raise ValueError("expected a JSON list of records")
        else:
            records = list(csv.DictReader(io.StringIO(text)))
    except (ValueError, csv.Error) as exc:
        raise OutputError(f"{path} is not a caption file this command wrote ({exc}); move it away or "
                          "choose another --output") from exc
    if not all(isinstance(r, dict) and isinstance(r.get("path"), str) for r in records):
        raise OutputError(f"{path}: every record needs a 'path'; move it away or choose another --output")
    return records


def _json_line(record: dict[str, Any]) -> str:
    return json.dumps(record, ensure_ascii=True) + "\n"


def _read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    if not path.is_file():
        return
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # the torn last line of a killed run: that image is captioned again
            if isinstance(record, dict) and isinstance(record.get("path"), str):
                yield record

