"""How the server's log lines look: plain text (the default) or one JSON object a line (``--log-format json``).

Both are built on the standard ``logging`` module. A log call gives what it knows of a request as
``extra=`` fields (``request_id``, ``model``, ``status``, ``duration_ms``, ``code``, ...); the text
format keeps its one scannable line, and the JSON format adds each field to the line's object::

    {"timestamp": "2026-12-06T14:38:06.123Z", "level": "INFO", "logger": "asyncserve.access",
     "message": "127.0.0.1:50412 \\"POST /v1/models/iris/predict\\" 200 27 1.2ms",
     "request_id": "9f1c...", "model": "iris", "status": 200, "duration_ms": 1.2, ...}
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import Any

import orjson

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_RECORD_ATTRIBUTES = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}
"""What every LogRecord has: anything else on a record came from ``extra=`` and goes into the JSON line."""


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object: timestamp (UTC, ISO 8601), level, logger, message, the
    ``extra=`` fields of the call, and the traceback, if any, as ``exception``.

    Example::

        handler.setFormatter(JsonFormatter())
        logging.getLogger("asyncserve").info("batch done", extra={"model": "iris", "rows": 32})
    """

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "timestamp": _timestamp(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name, value in record.__dict__.items():
            if name not in _RECORD_ATTRIBUTES and value is not None:
                line[name] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return orjson.dumps(line, default=str).decode()


def _timestamp(created: float) -> str:
    return datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def formatter(log_format: str) -> logging.Formatter:
    """The formatter of ``log_format`` (``text`` or ``json``, checked by ``Settings``)."""
    return JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)


def configure_logging(level: str, log_format: str) -> None:
    """Send every log line of the process to stderr, at ``level`` and in ``log_format``.

    Called by the command line and in each ``--workers`` process, never on import. In JSON, Python's
    warnings go through logging too, so that every line on stderr parses.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(log_format))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.captureWarnings(log_format == "json")
