"""Webhooks: when a job finishes, POST it to the job's URL, signed, retried, and never at the job's expense.

How a receiver checks a webhook
-------------------------------
Every request is a ``POST`` with a JSON body (the finished job) and these headers:

``X-Asyncserve-Event: job.completed``
    The job reached a final status; the body's ``status`` says which.
``X-Asyncserve-Delivery: <uuid>``
    One id per webhook, the same on every retry of it: receivers drop duplicates by it.
``X-Asyncserve-Attempt: <n>``
    1 for the first try, 2 for the first retry, and so on.
``X-Asyncserve-Timestamp: <unix seconds>``
    When this attempt was signed.
``X-Asyncserve-Signature: v1=<hex>``
    ``HMAC-SHA256(secret, f"{timestamp}.".encode() + body)`` in lowercase hex, where ``body`` is
    the raw request body, byte for byte. Future schemes will add ``, v2=...``; accept any ``v1``.

To verify, recompute the HMAC over the raw body with the shared secret and compare it in constant
time, and refuse timestamps more than five minutes away from your clock (a replayed request
carries an old timestamp, and changing the timestamp breaks the signature). :func:`verify` does
both::

    from asyncserve.jobs.webhooks import verify

    if not verify(secret, request.headers, await request.body()):
        return Response(status_code=401)

Answer 2xx to accept. Connection errors, timeouts, 408, 429 and 5xx are retried with exponential
backoff and jitter (``Retry-After`` is honoured, up to ``max_backoff_s``); other answers, redirects
included, are final. Every attempt is recorded on the job.

Where webhooks may go
---------------------
Unless ``allow_private`` is set, a webhook URL must be http(s) without credentials, and every
address its host resolves to must be public (not loopback, private, link-local, ...). The check
runs at submission (:func:`validate_webhook_url`) and again at delivery on the very address then
connected to, which defeats DNS rebinding; see :mod:`asyncserve.jobs.webhook_http`. Hosts in
``allowed_hosts`` skip it. Deliveries never go through an HTTP proxy.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Self
from urllib.parse import urlsplit

import orjson

from asyncserve.config import WebhookSettings
from asyncserve.exceptions import AsyncServeError, ConfigurationError, InvalidRequest
from asyncserve.jobs.webhook_http import (
    Reply,
    checked_addresses,
    failed_reply,
    open_pinned_client,
    post,
    split_webhook_url,
)

if TYPE_CHECKING:
    import httpx

logger = logging.getLogger(__name__)

EVENT_HEADER = "X-Asyncserve-Event"
DELIVERY_HEADER = "X-Asyncserve-Delivery"
ATTEMPT_HEADER = "X-Asyncserve-Attempt"
TIMESTAMP_HEADER = "X-Asyncserve-Timestamp"
SIGNATURE_HEADER = "X-Asyncserve-Signature"
EVENT = "job.completed"


# --- signing -----------------------------------------------------------------------------------


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The ``X-Asyncserve-Signature`` value for ``body`` signed at ``timestamp``: ``v1=<hex>``."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"v1={digest}"


def verify(
    secret: str, headers: Mapping[str, str], body: bytes, *, tolerance_s: float = 300.0, now: float | None = None
) -> bool:
    """For receivers: whether ``body`` and ``headers`` carry a valid signature made within ``tolerance_s``.

    ``headers`` may be any mapping (a framework's case-insensitive headers, or a plain dict);
    ``body`` must be the raw bytes received. ``now`` (unix seconds) is for tests.
    """
    if not secret:
        raise ValueError("verify needs the webhook secret the server signs with, got an empty one")
    lowered = {name.lower(): value for name, value in headers.items()}
    try:
        timestamp = int(lowered.get(TIMESTAMP_HEADER.lower(), ""))
    except ValueError:
        return False
    if abs((time.time() if now is None else now) - timestamp) > tolerance_s:
        return False
    expected = sign(secret, timestamp, body).encode()
    offered = lowered.get(SIGNATURE_HEADER.lower(), "").split(",")
    return any(hmac.compare_digest(expected, candidate.strip().encode()) for candidate in offered)


# --- where webhooks may go ---------------------------------------------------------------------


async def validate_webhook_url(url: str, settings: WebhookSettings) -> None:
    """Check a webhook URL at submission: well formed, and (unless allowed) every address public.

    Raises:
        InvalidRequest: the URL is malformed or refused; the message says why and what to do.
        InvalidRequest: also when the server has no webhook secret, so it sends no webhooks.
    """
    if not settings.enabled:
        # The client asked for what this server cannot do; it can submit again without a webhook.
        raise InvalidRequest(
            "this server does not send webhooks (its operator has not set ASYNCSERVE_WEBHOOK_SECRET); "
            "submit the job without a webhook and poll it or stream its events"
        )
    host, port = split_webhook_url(url)
    try:
        async with asyncio.timeout(settings.timeout_s):
            await checked_addresses(host, port, settings)
    except TimeoutError:
        raise InvalidRequest(f"webhook URL refused: resolving {host!r} took over {settings.timeout_s:g}s") from None


# --- delivery ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class WebhookAttempt:
    """One try at delivering a webhook, as recorded on the job."""

    attempt: int
    delivery_id: str
    started_at: float
    """Unix seconds."""
    status_code: int | None
    """The receiver's answer; None when there was none (refused, unreachable, timed out)."""
    error: str | None
    """Why the attempt failed; None when it succeeded."""
    duration_s: float

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


AttemptCallback = Callable[[WebhookAttempt], Awaitable[None]]


class WebhookDelivery:
    """Sends webhooks over one pooled HTTP client; an async context manager.

    Neither :meth:`deliver` nor :meth:`schedule` raises for a failed delivery: the attempts say
    what happened, each failed one is logged with the receiver's host, and the job is untouched.

    Example::

        async with WebhookDelivery(WebhookSettings.from_env()) as webhooks:
            webhooks.schedule(job.webhook, job.to_dict(), on_attempt=record_on_job)
    """

    def __init__(self, settings: WebhookSettings) -> None:
        self.settings = settings
        self._client: httpx.AsyncClient | None = None
        self._state = "new"
        self._tasks: set[asyncio.Task[list[WebhookAttempt]]] = set()
        self.delivered = self.failed = 0

    def __repr__(self) -> str:
        return (
            f"<WebhookDelivery {self._state} running={len(self._tasks)} "
            f"delivered={self.delivered} failed={self.failed}>"
        )

    async def __aenter__(self) -> Self:
        if self._state != "new":
            raise RuntimeError(f"Cannot reopen a WebhookDelivery that is {self._state}; make a new one")
        if self.settings.enabled:
            # Only a server that can send webhooks needs httpx (the optional ``client`` extra).
            self._client = await asyncio.to_thread(open_pinned_client, self.settings)
        self._state = "open"
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def deliver(
        self, url: str, payload: Mapping[str, Any], on_attempt: AttemptCallback | None = None
    ) -> list[WebhookAttempt]:
        """POST ``payload`` to ``url``, retrying as the settings say; returns every attempt made.

        ``on_attempt`` is awaited after each attempt (to record it on the job); if it raises, the
        error is logged and delivery carries on.
        """
        return await self._deliver(self._require_open(), url, payload, on_attempt)

    def schedule(self, url: str, payload: Mapping[str, Any], on_attempt: AttemptCallback | None = None) -> None:
        """Deliver in the background, in a task this object owns and :meth:`aclose` waits for."""
        client = self._require_open()
        task = asyncio.create_task(self._deliver(client, url, payload, on_attempt), name=f"webhook to {_host(url)}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    async def aclose(self, timeout_s: float | None = None) -> None:
        """Refuse new deliveries, wait up to ``timeout_s`` (default ``close_timeout_s``) for running
        ones, cancel what is left (logging how many), and close the client."""
        if self._state == "closed":
            return
        self._state = "closed"
        await self._drain(self.settings.close_timeout_s if timeout_s is None else timeout_s)
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def _require_open(self) -> httpx.AsyncClient | None:
        """The client to send with; None without a secret, when every delivery fails in :meth:`_prepare`."""
        if self._state != "open":
            raise RuntimeError(
                f"this WebhookDelivery is {self._state}; use it inside 'async with WebhookDelivery(settings)'"
            )
        return self._client

    async def _drain(self, timeout_s: float) -> None:
        if not self._tasks:
            return
        _, pending = await asyncio.wait(set(self._tasks), timeout=timeout_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        if pending:
            logger.warning(
                "cancelled %d webhook deliveries still running %gs after shutdown began; their jobs keep their "
                "results and the attempts recorded so far", len(pending), timeout_s,
            )  # fmt: skip

    def _task_done(self, task: asyncio.Task[list[WebhookAttempt]]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("%s: the delivery task crashed", task.get_name(), exc_info=task.exception())

    async def _deliver(
        self, client: httpx.AsyncClient | None, url: str, payload: Mapping[str, Any], on_attempt: AttemptCallback | None
    ) -> list[WebhookAttempt]:
        delivery_id = str(uuid.uuid4())
        try:
            client, body = self._prepare(client, url, payload)
        except AsyncServeError as exc:
            attempts = [WebhookAttempt(1, delivery_id, time.time(), None, exc.message, 0.0)]
            await self._report(attempts[0], url, on_attempt)
        else:
            attempts = await self._attempts(client, url, body, delivery_id, on_attempt)
        if attempts[-1].ok:
            self.delivered += 1
        else:
            self.failed += 1
        return attempts

    def _prepare(
        self, client: httpx.AsyncClient | None, url: str, payload: Mapping[str, Any]
    ) -> tuple[httpx.AsyncClient, bytes]:
        """The client and body to send, once the URL and settings allow sending at all."""
        if client is None:  # the client is opened only when a secret is set
            raise ConfigurationError("not sent: no webhook secret is configured (ASYNCSERVE_WEBHOOK_SECRET)")
        split_webhook_url(url)
        try:
            body = orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS)
        except TypeError as exc:
            raise InvalidRequest(f"not sent: the payload is not JSON-serializable ({exc})") from None
        if len(body) > self.settings.max_body_bytes:
            raise InvalidRequest(
                f"not sent: the payload is {len(body)} bytes, over max_body_bytes={self.settings.max_body_bytes} "
                "(ASYNCSERVE_WEBHOOK_MAX_BODY_BYTES); fetch the result from the job instead"
            )
        return client, body

    async def _attempts(
        self, client: httpx.AsyncClient, url: str, body: bytes, delivery_id: str, on_attempt: AttemptCallback | None
    ) -> list[WebhookAttempt]:
        attempts: list[WebhookAttempt] = []
        for number in range(1, self.settings.max_attempts + 1):
            attempt, reply = await self._attempt(client, url, body, delivery_id, number)
            attempts.append(attempt)
            await self._report(attempt, url, on_attempt)
            if not reply.retry or number == self.settings.max_attempts:
                break
            await asyncio.sleep(self._delay_s(number, reply.retry_after_s))
        return attempts

    async def _attempt(
        self, client: httpx.AsyncClient, url: str, body: bytes, delivery_id: str, number: int
    ) -> tuple[WebhookAttempt, Reply]:
        started_at, start = time.time(), time.perf_counter()
        headers = self._headers(body, delivery_id, number)
        try:
            async with asyncio.timeout(self.settings.timeout_s):
                reply = await post(client, url, body, headers)
        except Exception as exc:  # each failure becomes the attempt's error; none escapes
            reply = failed_reply(exc, self.settings.timeout_s)
        duration_s = time.perf_counter() - start
        return WebhookAttempt(number, delivery_id, started_at, reply.status_code, reply.error, duration_s), reply

    def _headers(self, body: bytes, delivery_id: str, number: int) -> dict[str, str]:
        timestamp = int(time.time())
        return {
            "Content-Type": "application/json",
            "User-Agent": "asyncserve-webhooks",
            "Accept-Encoding": "identity",  # answers are read raw, never decompressed
            EVENT_HEADER: EVENT,
            DELIVERY_HEADER: delivery_id,
            ATTEMPT_HEADER: str(number),
            TIMESTAMP_HEADER: str(timestamp),
            SIGNATURE_HEADER: sign(self.settings.secret, timestamp, body),
        }

    def _delay_s(self, retry: int, retry_after_s: float | None) -> float:
        """The wait before retry number ``retry``: the receiver's Retry-After, or the jittered backoff."""
        if retry_after_s is not None:
            return min(retry_after_s, self.settings.max_backoff_s)
        delay = min(self.settings.backoff_s * 2.0 ** (retry - 1), self.settings.max_backoff_s)
        return delay * random.uniform(0.5, 1.0)

    async def _report(self, attempt: WebhookAttempt, url: str, on_attempt: AttemptCallback | None) -> None:
        host = _host(url)
        if not attempt.ok:
            logger.warning(
                "webhook %s to %s failed (attempt %d of %d): %s",
                attempt.delivery_id, host, attempt.attempt, self.settings.max_attempts, attempt.error,
            )  # fmt: skip
        if on_attempt is None:
            return
        try:
            await on_attempt(attempt)
        except Exception as exc:
            logger.warning("webhook %s to %s: recording attempt %d failed: %r", attempt.delivery_id, host,
                           attempt.attempt, exc)  # fmt: skip


def _host(url: str) -> str:
    """The URL's host, for log lines (which never carry the whole URL: its query may hold a token)."""
    try:
        return urlsplit(url).hostname or "?"
    except ValueError:
        return "?"
