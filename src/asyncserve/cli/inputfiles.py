"""Rows of model inputs from a file: JSON Lines (one inputs object per line) or CSV (a header row names the inputs).

Each row keeps its line number in the file, so that whatever becomes of it (a job, a result, an
error) can be traced back. CSV cells become JSON values: numbers, ``true``/``false``, and a cell
holding a JSON list or object (quote it: ``"[1, 2, 3]"``) are parsed; anything else stays a string.

Example::

    for row in read_rows(Path("inputs.csv")):
        print(row.line, row.inputs)      # 2 {'age': 42, 'history': [1, 0, 1]}
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from asyncserve.exceptions import ConfigurationError

_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


@dataclass(frozen=True)
class Row:
    """One row of inputs, and its line in the file (a CSV header is line 1; a quoted cell may span lines:
    the record's last line)."""

    line: int
    inputs: Any


def read_rows(path: Path) -> list[Row]:
    """The rows of a JSON Lines or (by its ``.csv`` suffix) CSV file, with their line numbers."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise ConfigurationError(f"cannot read {path}: {exc.strerror}") from None
    rows = _csv_rows(text, path) if path.suffix.lower() == ".csv" else _json_rows(text, path)
    if not rows:
        raise ConfigurationError(f"{path} holds no rows")
    return rows


def _json_rows(text: str, path: Path) -> list[Row]:
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(Row(number, orjson.loads(line)))
            except orjson.JSONDecodeError as exc:
                raise ConfigurationError(f"line {number} of {path} is not JSON: {exc}") from None
    return rows


def _csv_rows(text: str, path: Path) -> list[Row]:
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, [])
    rows = []
    for cells in reader:
        if not cells:
            continue  # a blank line
        if len(cells) != len(header):
            raise ConfigurationError(f"line {reader.line_num} of {path} has {len(cells)} cells, its header "
                                     f"{len(header)} (quote a cell that holds a comma: \"[1, 2]\")")  # fmt: skip
        rows.append(Row(reader.line_num, {name: parse_cell(cell) for name, cell in zip(header, cells, strict=True)}))
    return rows


def parse_cell(cell: str) -> Any:
    """A CSV cell as a JSON value: a number, a bool, a JSON list or object, or else the text itself."""
    text = cell.strip()
    if _NUMBER.fullmatch(text):
        return float(text) if any(c in text for c in ".eE") else int(text)
    if text in ("true", "false"):
        return text == "true"
    if text[:1] in ("[", "{"):
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError:
            pass
    return cell
