"""The slow feature service of the I/O benchmark: user rows that take 50 ms to come back.

A bare ASGI app, run with ``uvicorn benchmarks.io_feature_service:app`` (uvloop, httptools). It knows
users ``0 .. USERS - 1``, whose rows are encoded once at import, and answers:

- ``GET /users/{id}``: the row as JSON after ``asyncio.sleep(DELAY_S)``, or 404 for an unknown id;
- ``POST /users:batch`` with ``{"keys": [...]}``: ``{"<id>": row or null, ...}`` after ONE sleep of
  ``DELAY_S`` per call, however many keys it holds;
- ``GET /v2/health/ready``: ``{"ready": true}`` at once (the harness's readiness probe);
- ``GET /stats``: the calls and keys this process has served (one process: run it with one worker
  for exact numbers).

``IO_FEATURE_DELAY_S`` overrides the delay (seconds). Every server of the benchmark, and its
Postgres table, derive the same row from a user id with ``user_row``.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import orjson

from benchmarks import bare
from benchmarks.bare import Receive, Scope, Send

USERS = 10_000
DELAY_S = float(os.environ.get("IO_FEATURE_DELAY_S", "0.05"))
COUNTRIES = ("fr", "de", "es", "it", "pl", "nl", "se", "pt", "ie", "at", "be", "dk")
PLANS = ("free", "basic", "pro", "team")


def user_row(user_id: int) -> dict[str, Any]:
    """The features of one user: a row of a few mixed fields, about 100 bytes of JSON."""
    return {
        "age": float(18 + (user_id * 7) % 60),
        "country": COUNTRIES[(user_id * 13) % len(COUNTRIES)],
        "tenure_months": (user_id * 11) % 120,
        "plan": PLANS[user_id % len(PLANS)],
        "sessions_30d": (user_id * 17) % 90,
    }


_ROWS: dict[int, dict[str, Any]] = {user_id: user_row(user_id) for user_id in range(USERS)}
_ENCODED: dict[int, bytes] = {user_id: orjson.dumps(row) for user_id, row in _ROWS.items()}
_NOT_FOUND = b'{"error":"no such user"}'
_STATS = {"gets": 0, "batch_calls": 0, "batch_keys": 0}


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    """The ASGI entry point."""
    if scope["type"] == "lifespan":
        await bare.lifespan(receive, send)
        return
    method, path = scope["method"], scope["path"]
    if method == "GET" and path.startswith("/users/"):
        await _get_user(path[len("/users/") :], send)
    elif method == "POST" and path == "/users:batch":
        await _get_batch(await bare.read_body(receive), send)
    elif method == "GET" and path == "/v2/health/ready":
        await bare.respond(send, 200, b'{"ready":true}')
    elif method == "GET" and path == "/stats":
        await bare.respond(send, 200, orjson.dumps(_STATS))
    else:
        await bare.respond(send, 404, b'{"error":"not found"}')


async def _get_user(raw_id: str, send: Send) -> None:
    await asyncio.sleep(DELAY_S)
    _STATS["gets"] += 1
    encoded = _ENCODED.get(int(raw_id)) if raw_id.isdigit() else None
    if encoded is None:
        await bare.respond(send, 404, _NOT_FOUND)
    else:
        await bare.respond(send, 200, encoded)


async def _get_batch(body: bytes, send: Send) -> None:
    try:
        keys = orjson.loads(body)["keys"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        await bare.respond(send, 400, b'{"error":"expected {\\"keys\\": [...]}"}')
        return
    await asyncio.sleep(DELAY_S)
    _STATS["batch_calls"] += 1
    _STATS["batch_keys"] += len(keys)
    await bare.respond(send, 200, orjson.dumps({str(key): _ROWS.get(key) for key in keys}))
