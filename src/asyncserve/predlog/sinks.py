"""The contract every prediction-log sink keeps, and ``open_sink(url)``, which picks one by URL scheme."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from asyncserve.exceptions import ConfigurationError

if TYPE_CHECKING:
    from asyncserve.predlog.records import LogRecord

SUPPORTED_URLS = (
    "jsonl:///abs/path.jsonl (or a plain path ending in .jsonl)",
    "sqlite:///abs/path.db (or a plain path ending in .db, .sqlite or .sqlite3)",
    "postgresql://user@host:5432/db?table=predictions",
    "redis://host:6379/0?stream=asyncserve:predictions&maxlen=1000000&dedup_window_s=3600",
)
_SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")


@runtime_checkable
class LogSink(Protocol):
    """Where the prediction logger writes its batches.

    The logger calls ``open()`` (again after it raised, until it succeeds), then ``write()`` one
    batch at a time (never concurrently), then ``aclose()`` once. ``write`` either stores the
    whole batch or raises: the logger retries a batch that raised and, past its retries, spills it
    to a local file, to write it again later. While the sink is failing, the logger calls
    ``write`` with no records to learn whether it answers again: a sink should then reach its
    store if it has one (a round trip), and return. Each call may be cancelled by the logger's write
    timeout, and should then end promptly. A write that raised (or was cancelled) may have landed
    anyway, so a sink should store a record at most once per ``LogRecord.log_id`` (a unique key);
    the sinks here all do. ``name`` (like ``"postgres:predictions"``) labels the sink's metrics and
    log lines, so it must not hold secrets.

    Example, a sink of your own::

        class PrintSink:
            name = "print"
            async def open(self) -> None: ...
            async def write(self, records: Sequence[LogRecord]) -> None:
                for record in records:
                    print(record.json.decode())
            async def aclose(self) -> None: ...
    """

    @property
    def name(self) -> str: ...

    async def open(self) -> None: ...

    async def write(self, records: Sequence[LogRecord]) -> None: ...

    async def aclose(self) -> None: ...


def open_sink(url: str) -> LogSink:
    """Build the sink a URL names (not yet opened: the logger opens it when it starts).

    Example::

        open_sink("var/predictions.jsonl")
        open_sink("sqlite:///var/predictions.db")
        open_sink("postgresql://app@db:5432/ml?table=predictions")
        open_sink("redis://cache:6379/0?stream=preds&maxlen=100000")

    Raises:
        ConfigurationError: the scheme is unknown, an option is invalid, or the backend's optional
            dependency is missing (the message has the ``pip install`` line).
    """
    scheme = urlsplit(url).scheme.lower() if "://" in url else ""
    if scheme in ("", "jsonl", "sqlite"):
        return _file_sink(scheme, url)
    if scheme in ("postgresql", "postgres"):
        from asyncserve.predlog.postgres import PostgresSink

        dsn, options = _pop_query(url, ("table",))
        return PostgresSink(dsn, table=options.get("table", "predictions"))
    if scheme in ("redis", "rediss"):
        from asyncserve.predlog.redis import DEFAULT_STREAM, RedisStreamSink

        redis_url, options = _pop_query(url, ("stream", "maxlen", "dedup_window_s"))
        stream = options.get("stream", DEFAULT_STREAM)
        maxlen, window_s = _maxlen(options.get("maxlen")), _window_s(options.get("dedup_window_s"))
        return RedisStreamSink(redis_url, stream=stream, maxlen=maxlen, dedup_window_s=window_s)
    raise _unsupported(url)


def check_identifier(kind: str, name: str) -> str:
    """Return ``name`` if it is a plain SQL identifier, as table names must be (they cannot be bound)."""
    if not _IDENTIFIER.fullmatch(name):
        raise ConfigurationError(
            f"{kind} must be a plain identifier (a letter or _, then letters, digits or _, at most 63), got {name!r}"
        )
    return name


def _file_sink(scheme: str, url: str) -> LogSink:
    from asyncserve.predlog.files import JsonlSink
    from asyncserve.predlog.sqlite import SQLiteSink

    path = _path_of(url) if scheme else url
    if scheme == "jsonl" or (not scheme and path.endswith(".jsonl")):
        return JsonlSink(Path(path))
    if scheme == "sqlite" or (not scheme and path.endswith(_SQLITE_SUFFIXES)):
        return SQLiteSink(Path(path))
    raise _unsupported(url)


def _path_of(url: str) -> str:
    # Everything after "scheme://" is the path: "jsonl:///var/p.jsonl" is absolute, "jsonl://p.jsonl" relative.
    path = url.split("://", 1)[1]
    if not path or path == "/":
        raise ConfigurationError(f"the sink URL {url!r} names no file; write it like {SUPPORTED_URLS[0]!r}")
    return path


def _pop_query(url: str, names: tuple[str, ...]) -> tuple[str, dict[str, str]]:
    """Take our own options out of a URL's query, leaving the rest for the driver."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    options = {key: value for key, value in query if key in names}
    rest = urlencode([(key, value) for key, value in query if key not in names])
    return urlunsplit(parts._replace(query=rest)), options


def _maxlen(raw: str | None) -> int | None:
    if raw is None:
        return 1_000_000
    if raw.lower() in ("", "none", "0"):
        return None
    if not raw.isdigit():
        raise ConfigurationError(f"maxlen must be a whole number of entries (or 'none'), got {raw!r}")
    return int(raw)


def _window_s(raw: str | None) -> float | None:
    from asyncserve.predlog.redis import DEFAULT_DEDUP_WINDOW_S

    if raw is None:
        return DEFAULT_DEDUP_WINDOW_S
    if raw.lower() in ("", "none", "0"):
        return None
    try:
        return float(raw)
    except ValueError:
        raise ConfigurationError(f"dedup_window_s must be a number of seconds (or 'none'), got {raw!r}") from None


def _unsupported(url: str) -> ConfigurationError:
    supported = "; ".join(SUPPORTED_URLS)
    return ConfigurationError(f"no prediction-log sink for {url!r}; the supported URLs are: {supported}")
