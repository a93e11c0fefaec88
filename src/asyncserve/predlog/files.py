"""JSON Lines files with size-based rotation: the embedded default sink."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from asyncserve.exceptions import ConfigurationError
from asyncserve.predlog.records import LogRecord
from asyncserve.predlog.spill import in_thread

MiB = 1024 * 1024


class JsonlSink:
    """Appends each record as one line of JSON to ``path``, rotating ``path`` → ``path.1`` … ``path.{keep}``.

    A batch is written with one ``write`` call in a worker thread, never on the event loop. When
    a batch would take the file past ``rotate_bytes``, the file is rotated first; the oldest
    backup beyond ``keep`` is deleted. ``rotate_bytes=None`` never rotates. ``fsync=True`` makes
    each batch durable against a power cut before ``write`` returns; without it, a batch survives
    the process dying but not the machine.

    A write that raised left nothing in the file: a failed one is cut off, and one cancelled (by
    the logger's write timeout) is waited for, then cut off if it had finished. So a batch written
    again after a failure (a retry, a replay of the spill file) is not stored twice. (A file
    cannot look up a ``log_id`` as the database sinks do.)

    Example::

        async with PredictionLogger(JsonlSink(Path("var/predictions.jsonl"), keep=5)) as log:
            log.record(prediction_record(...))
    """

    def __init__(
        self, path: Path | str, *, rotate_bytes: int | None = 64 * MiB, keep: int = 10, fsync: bool = False
    ) -> None:
        if rotate_bytes is not None and rotate_bytes < 1:
            raise ConfigurationError(f"rotate_bytes must be a positive number of bytes or None, got {rotate_bytes}")
        if keep < 1:
            raise ConfigurationError(f"keep must be an integer >= 1 (the rotated files to keep), got {keep}")
        self.path = Path(path)
        self.name = f"jsonl:{self.path}"
        self.rotate_bytes = rotate_bytes
        self.keep = keep
        self.fsync = fsync
        self._file: BinaryIO | None = None
        self._size = 0
        # Serialises writes and rotation: a rotation racing a write would tear the file.
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"JsonlSink({str(self.path)!r}, rotate_bytes={self.rotate_bytes}, keep={self.keep})"

    async def open(self) -> None:
        async with self._lock:
            await in_thread(self._open)

    async def write(self, records: Sequence[LogRecord]) -> None:
        if not records:
            return
        data = b"".join(record.json + b"\n" for record in records)
        async with self._lock:
            task = asyncio.ensure_future(in_thread(self._append, data))
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError:
                await asyncio.wait({task})
                if not task.cancelled() and task.exception() is None:
                    # It finished in its thread after all: take it back, since the caller counts it as not written.
                    await asyncio.wait({asyncio.ensure_future(in_thread(self._truncate, task.result()))})
                raise

    async def aclose(self) -> None:
        async with self._lock:
            if self._file is not None:
                await in_thread(self._file.close)
                self._file = None

    # Everything below runs in a worker thread.

    def _open(self) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "ab")  # noqa: SIM115 (kept open across batches, closed in aclose)
            self._size = self._file.tell()

    def _append(self, data: bytes) -> int:
        """Append ``data`` (rotating first if it would not fit) and return the file's size before it."""
        self._open()
        if self.rotate_bytes is not None and self._size > 0 and self._size + len(data) > self.rotate_bytes:
            self._rotate()
        file = self._file
        if file is None:  # pragma: no cover (opened just above)
            raise RuntimeError("the JSON Lines file is not open")
        try:
            file.write(data)
            file.flush()
            if self.fsync:
                os.fsync(file.fileno())
        except BaseException:
            # Cut a partial batch off, so that the retry does not follow half a line.
            self._file = None
            with contextlib.suppress(OSError):
                file.close()
            with contextlib.suppress(OSError):
                os.truncate(self.path, self._size)
            raise
        before, self._size = self._size, self._size + len(data)
        return before

    def _truncate(self, size: int) -> None:
        if self._file is not None and self._size > size:
            self._file.truncate(size)
            self._size = size

    def _rotate(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._backup(self.keep).unlink(missing_ok=True)
        for index in range(self.keep - 1, 0, -1):
            if self._backup(index).exists():
                self._backup(index).rename(self._backup(index + 1))
        self.path.rename(self._backup(1))
        self._open()

    def _backup(self, index: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{index}")
