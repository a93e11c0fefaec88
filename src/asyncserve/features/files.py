"""FileSource: a lookup table in a CSV, JSON or JSON Lines file, read off the loop and reloaded when it changes."""

from __future__ import annotations

import asyncio
import csv
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson

from asyncserve.exceptions import ConfigurationError
from asyncserve.features.source import FeatureSource, Key, Row

_FORMATS = (".csv", ".json", ".jsonl")


class FileSource(FeatureSource):
    """Rows of a table file by ``key_column``; the file is re-read (in a thread) when its mtime changes.

    CSV values arrive as text and are converted to the declared datatypes; a ``.json`` file holds a
    list of objects, a ``.jsonl`` file one object per line.

    Example::

        prices = FileSource("prices", "data/prices.csv", key_column="sku", check_interval_s=1.0)
    """

    def __init__(
        self, name: str, path: str | Path, *, key_column: str, check_interval_s: float = 1.0, **policy: Any
    ) -> None:
        super().__init__(name, **policy)
        self.path = Path(path)
        if self.path.suffix not in _FORMATS:
            raise ConfigurationError(f"FileSource {name!r}: {self.path} must end in one of {', '.join(_FORMATS)}")
        self.key_column = key_column
        self.check_interval_s = check_interval_s
        self.reloads = 0
        self._table: dict[Key, Row] = {}
        self._mtime_ns = -1
        self._checked_at = 0.0
        self._reloading = asyncio.Lock()

    async def _open(self) -> None:
        await self._reload_if_changed(force=True)

    async def _fetch(self, keys: list[Key]) -> Mapping[Key, Row]:
        if time.monotonic() - self._checked_at >= self.check_interval_s:
            await self._reload_if_changed()
        return {key: self._table[key] for key in keys if key in self._table}

    async def _reload_if_changed(self, *, force: bool = False) -> None:
        async with self._reloading:
            self._checked_at = time.monotonic()
            mtime_ns = (await asyncio.to_thread(self.path.stat)).st_mtime_ns
            if mtime_ns == self._mtime_ns and not force:
                return
            self._table = await asyncio.to_thread(_read_table, self.path, self.key_column)
            self._mtime_ns = mtime_ns
            self.reloads += 1


def _read_table(path: Path, key_column: str) -> dict[Key, Row]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".csv":
        rows: list[dict[str, Any]] = list(csv.DictReader(text.splitlines()))
    elif path.suffix == ".jsonl":
        rows = [orjson.loads(line) for line in text.splitlines() if line.strip()]
    else:
        rows = orjson.loads(text)
    try:
        return {_key(row[key_column]): row for row in rows}
    except KeyError:
        raise ConfigurationError(f"{path}: a row has no key column {key_column!r}") from None


def _key(value: Any) -> Key:
    # CSV keys are text; a numeric key is looked up by the integer the request carries.
    if isinstance(value, str) and value.lstrip("-").isdigit():
        return int(value)
    key: Key = value
    return key
