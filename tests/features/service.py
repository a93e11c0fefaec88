"""A real HTTP feature service for the tests, on loopback: per-key GETs, a batch endpoint, and failure knobs."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

Scope = dict[str, Any]


def user_row(user_id: int) -> dict[str, Any]:
    return {"age": float(20 + user_id % 50), "country": f"c{user_id % 5}"}


class FeatureService:
    """Users 0..999 exist; answers after ``delay_s``; the next ``fail_next`` calls answer 500."""

    def __init__(self) -> None:
        self.delay_s = 0.0
        self.fail_next = 0
        self.gets = 0
        self.batch_calls = 0
        self.batch_keys: list[int] = []

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        status, payload = self._answer(scope["path"], body)
        await send(
            {"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]}
        )
        await send({"type": "http.response.body", "body": orjson.dumps(payload)})

    def _answer(self, path: str, body: bytes) -> tuple[int, Any]:
        if self.fail_next > 0:
            self.fail_next -= 1
            return 500, {"error": "injected failure"}
        if path == "/users:batch":
            keys = orjson.loads(body)["keys"]
            self.batch_calls += 1
            self.batch_keys.extend(keys)
            return 200, {str(k): user_row(k) if k < 1000 else None for k in keys}
        user_id = int(path.rsplit("/", 1)[1])
        self.gets += 1
        return (200, user_row(user_id)) if user_id < 1000 else (404, {"error": "no such user"})
