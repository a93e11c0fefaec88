"""Webhooks against a real receiver on loopback: signing, retries, time limits, SSRF refusal, shutdown."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest

from asyncserve.config import WebhookSettings
from asyncserve.exceptions import ConfigurationError, InvalidRequest
from asyncserve.jobs.webhooks import (
    DELIVERY_HEADER,
    EVENT_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    WebhookAttempt,
    WebhookDelivery,
    sign,
    validate_webhook_url,
    verify,
)
from tests.conftest import serving_asgi

SECRET = "test-secret-0123456789abcdef"
JOB = {"id": "job-1", "status": "succeeded", "result": {"outputs": [1.5, 2.5]}}


@dataclass
class Reply:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    body: bytes = b"ok"


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes


class Receiver:
    """A webhook receiver: records each request and answers the next scripted reply (the last repeats)."""

    def __init__(self) -> None:
        self.script(Reply())

    def script(self, *replies: Reply) -> None:
        self.replies = list(replies)
        self.requests: list[Received] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        self.requests.append(Received({k.decode(): v.decode() for k, v in scope["headers"]}, body))
        reply = self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]
        await asyncio.sleep(reply.delay_s)
        headers = [(k.encode(), v.encode()) for k, v in reply.headers.items()]
        await send({"type": "http.response.start", "status": reply.status, "headers": headers})
        await send({"type": "http.response.body", "body": reply.body})


@pytest.fixture(scope="module")
async def receiver_server() -> AsyncIterator[tuple[Receiver, str]]:
    receiver = Receiver()
    async with serving_asgi(receiver) as url:
        yield receiver, url


@pytest.fixture
def receiver(receiver_server: tuple[Receiver, str]) -> Receiver:
    receiver_server[0].script(Reply())
    return receiver_server[0]


@pytest.fixture
def url(receiver_server: tuple[Receiver, str]) -> str:
    return receiver_server[1] + "/hooks/job"


def settings(**overrides: Any) -> WebhookSettings:
    """Loopback allowed by host name, as a test receiver needs; tiny backoff so retries are quick."""
    values: dict[str, Any] = {"secret": SECRET, "allowed_hosts": frozenset({"127.0.0.1"}), "backoff_s": 0.001,
                              "max_backoff_s": 0.05, "timeout_s": 2.0}  # fmt: skip
    return WebhookSettings(**{**values, **overrides})


async def deliver(url: str, config: WebhookSettings | None = None, payload: Any = JOB) -> list[WebhookAttempt]:
    async with WebhookDelivery(config or settings()) as webhooks:
        return await webhooks.deliver(url, payload)


# --- signing -----------------------------------------------------------------------------------


async def test_the_receiver_verifies_the_signature_over_the_raw_body(receiver: Receiver, url: str) -> None:
    attempts = await deliver(url)

    assert [(a.attempt, a.status_code, a.error) for a in attempts] == [(1, 200, None)]
    request = receiver.requests[0]
    assert orjson.loads(request.body) == JOB
    assert request.headers["content-type"] == "application/json"
    assert request.headers[EVENT_HEADER.lower()] == "job.completed"
    assert request.headers[DELIVERY_HEADER.lower()] == attempts[0].delivery_id
    assert verify(SECRET, request.headers, request.body)
    assert request.headers[SIGNATURE_HEADER.lower()] == sign(
        SECRET, int(request.headers[TIMESTAMP_HEADER.lower()]), request.body
    )


async def test_a_tampered_body_a_wrong_secret_or_an_old_timestamp_fail_verification(
    receiver: Receiver, url: str
) -> None:
    await deliver(url)
    request = receiver.requests[0]
    signed_at = int(request.headers[TIMESTAMP_HEADER.lower()])

    assert not verify(SECRET, request.headers, request.body.replace(b"1.5", b"9.5"))
    assert not verify("another-secret-0123456789", request.headers, request.body)
    assert not verify(SECRET, request.headers, request.body, now=signed_at + 301)
    assert verify(SECRET, request.headers, request.body, now=signed_at + 299)
    # A replay with a fresh timestamp but the old signature fails too.
    assert not verify(SECRET, {**request.headers, TIMESTAMP_HEADER: str(signed_at + 1)}, request.body)
    assert not verify(SECRET, {}, request.body)


def test_verify_accepts_any_v1_signature_among_several() -> None:
    body, now = b'{"id":"x"}', int(time.time())
    headers = {"X-ASYNCSERVE-TIMESTAMP": str(now), "x-asyncserve-signature": f"v1=00ff, {sign(SECRET, now, body)}"}

    assert verify(SECRET, headers, body)


# --- retries -----------------------------------------------------------------------------------


async def test_a_500_is_retried_and_every_attempt_is_recorded(receiver: Receiver, url: str) -> None:
    receiver.script(Reply(500, body=b"database down"), Reply(503, body=b""), Reply(200))
    recorded: list[WebhookAttempt] = []

    async def on_attempt(attempt: WebhookAttempt) -> None:
        recorded.append(attempt)

    async with WebhookDelivery(settings()) as webhooks:
        attempts = await webhooks.deliver(url, JOB, on_attempt)

    assert recorded == attempts
    assert [(a.attempt, a.status_code, a.error) for a in attempts] == [
        (1, 500, "HTTP 500: database down"),
        (2, 503, "HTTP 503"),
        (3, 200, None),
    ]
    assert len({a.delivery_id for a in attempts}) == 1
    assert [r.headers["x-asyncserve-attempt"] for r in receiver.requests] == ["1", "2", "3"]
    assert all(verify(SECRET, r.headers, r.body) for r in receiver.requests)
    assert attempts[-1].to_dict()["status_code"] == 200


async def test_delivery_stops_after_max_attempts_and_logs_each_failure(
    receiver: Receiver, url: str, caplog: pytest.LogCaptureFixture
) -> None:
    receiver.script(Reply(502))

    with caplog.at_level(logging.WARNING, "asyncserve.jobs.webhooks"):
        attempts = await deliver(url, settings(max_attempts=3))

    assert [a.status_code for a in attempts] == [502, 502, 502]
    assert len(receiver.requests) == 3
    failures = [r.getMessage() for r in caplog.records]
    assert len(failures) == 3
    assert "to 127.0.0.1 failed (attempt 3 of 3): HTTP 502" in failures[-1]


async def test_a_400_is_final(receiver: Receiver, url: str) -> None:
    receiver.script(Reply(400, body=b"bad signature"))

    attempts = await deliver(url)

    assert [(a.status_code, a.error) for a in attempts] == [(400, "HTTP 400: bad signature")]


async def test_a_redirect_is_not_followed(receiver: Receiver, url: str) -> None:
    receiver.script(Reply(302, {"location": "http://169.254.169.254/latest/meta-data/"}))

    attempts = await deliver(url)

    assert len(attempts) == 1
    assert attempts[0].status_code == 302
    assert "not followed" in (attempts[0].error or "")
    assert len(receiver.requests) == 1


async def test_retry_after_is_honoured(receiver: Receiver, url: str) -> None:
    receiver.script(Reply(429, {"retry-after": "0.3"}), Reply(200))

    attempts = await deliver(url, settings(max_backoff_s=5.0))

    assert [a.status_code for a in attempts] == [429, 200]
    assert attempts[1].started_at - attempts[0].started_at >= 0.3


async def test_retry_after_is_capped_by_max_backoff(receiver: Receiver, url: str) -> None:
    receiver.script(Reply(503, {"retry-after": "3600"}), Reply(200))
    started = time.perf_counter()

    attempts = await deliver(url, settings(max_backoff_s=0.05))

    assert [a.status_code for a in attempts] == [503, 200]
    assert time.perf_counter() - started < 1.0


async def test_a_timeout_is_a_failed_attempt_and_is_retried(receiver: Receiver, url: str) -> None:
    receiver.script(Reply(200, delay_s=0.5), Reply(200))

    attempts = await deliver(url, settings(timeout_s=0.1))

    assert [(a.status_code, a.error) for a in attempts] == [(None, "timed out after 0.1s"), (200, None)]
    assert attempts[0].duration_s < 0.4


async def test_an_unreachable_receiver_is_retried_then_given_up() -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    attempts = await deliver(f"http://127.0.0.1:{port}/", settings(max_attempts=2))

    assert [a.status_code for a in attempts] == [None, None]
    assert all("ConnectError" in (a.error or "") for a in attempts)


async def test_a_failing_on_attempt_callback_does_not_stop_delivery(
    receiver: Receiver, url: str, caplog: pytest.LogCaptureFixture
) -> None:
    receiver.script(Reply(500), Reply(200))

    async def on_attempt(attempt: WebhookAttempt) -> None:
        raise RuntimeError("job store down")

    async with WebhookDelivery(settings()) as webhooks:
        attempts = await webhooks.deliver(url, JOB, on_attempt)

    assert [a.status_code for a in attempts] == [500, 200]
    assert "recording attempt 2 failed: RuntimeError('job store down')" in caplog.text


@pytest.mark.parametrize(
    ("config", "payload", "error"),
    [
        (settings(secret=""), JOB, "no webhook secret is configured"),
        (settings(max_body_bytes=10), JOB, "over max_body_bytes=10"),
        (settings(), {"when": object()}, "not JSON-serializable"),
    ],
)
async def test_what_cannot_be_sent_is_one_failed_attempt_and_no_request(
    receiver: Receiver, url: str, config: WebhookSettings, payload: Any, error: str
) -> None:
    attempts = await deliver(url, config, payload)

    assert len(attempts) == 1
    assert attempts[0].status_code is None
    assert error in (attempts[0].error or "")
    assert receiver.requests == []


# --- SSRF --------------------------------------------------------------------------------------

REFUSED = [
    ("http://127.0.0.1:8080/hook", "127.0.0.1 is a loopback address"),
    ("http://localhost/hook", "localhost resolves to"),
    ("http://10.0.0.5/hook", "10.0.0.5 is a private address"),
    ("http://192.168.1.20/hook", "192.168.1.20 is a private address"),
    ("http://169.254.169.254/latest/meta-data/", "169.254.169.254 is a link-local address"),
    ("http://[::1]/hook", "::1 is a loopback address"),
    ("http://[::ffff:127.0.0.1]/hook", "is a loopback address"),
    ("http://[fd00::1]/hook", "fd00::1 is a private address"),
    ("http://0.0.0.0/hook", "0.0.0.0 is an unspecified address"),
    ("http://[::]/hook", ":: is an unspecified address"),
    ("http://224.0.0.1/hook", "224.0.0.1 is a multicast address"),
    ("http://100.64.0.1/hook", "100.64.0.1 is not a public address"),
    ("http://2130706433/hook", "2130706433 resolves to 127.0.0.1, a loopback address"),
]


@pytest.mark.parametrize(("url", "message"), REFUSED)
async def test_private_and_loopback_urls_are_refused_by_default(url: str, message: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        await validate_webhook_url(url, WebhookSettings(secret=SECRET))

    assert message in refused.value.message
    assert "set ASYNCSERVE_WEBHOOK_ALLOW_PRIVATE=true" in refused.value.message
    assert refused.value.status_code == 400


@pytest.mark.parametrize("url", [url for url, _ in REFUSED])
async def test_private_urls_are_allowed_when_the_configuration_says_so(url: str) -> None:
    await validate_webhook_url(url, WebhookSettings(secret=SECRET, allow_private=True))


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("file:///etc/passwd", "must start with http:// or https://"),
        ("gopher://example.com/", "must start with http:// or https://"),
        ("http://user:pw@example.com/hook", "must not contain credentials"),
        ("http:///hook", "has no host"),
        ("http://example.com:99999/", "invalid port"),
        ("http://example.com\\@127.0.0.1/", "backslashes"),
        ("http://[::1/", "malformed"),
    ],
)
async def test_malformed_urls_are_refused_even_when_private_addresses_are_allowed(url: str, message: str) -> None:
    with pytest.raises(InvalidRequest, match="webhook URL") as refused:
        await validate_webhook_url(url, WebhookSettings(secret=SECRET, allow_private=True))

    assert message in refused.value.message


async def test_public_addresses_pass() -> None:
    for url in ("https://93.184.216.34/hook", "http://[2606:4700::1111]:8443/hook"):
        await validate_webhook_url(url, WebhookSettings(secret=SECRET))


async def test_submitting_a_webhook_without_a_secret_is_a_configuration_error() -> None:
    with pytest.raises(InvalidRequest, match="ASYNCSERVE_WEBHOOK_SECRET"):
        await validate_webhook_url("https://93.184.216.34/hook", WebhookSettings())


async def test_a_name_resolving_to_loopback_is_refused_at_delivery(receiver: Receiver, url: str) -> None:
    by_name = url.replace("127.0.0.1", "localhost")

    attempts = await deliver(by_name)

    assert len(attempts) == 1
    assert attempts[0].status_code is None
    assert "localhost resolves to" in (attempts[0].error or "")
    assert receiver.requests == []


async def test_a_listed_host_name_is_allowed(receiver: Receiver, url: str) -> None:
    by_name = url.replace("127.0.0.1", "localhost")

    attempts = await deliver(by_name, settings(allowed_hosts=frozenset({"localhost", "other.example"})))

    assert [a.status_code for a in attempts] == [200]
    assert len(receiver.requests) == 1


@pytest.fixture
def rebinding_dns(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """hooks.example resolves to a public address the first time, then to loopback (DNS rebinding)."""
    answers = ["93.184.216.34", "127.0.0.1"]
    asked: list[str] = []
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host != "hooks.example":
            return real(host, port, *args, **kwargs)
        address = answers[min(len(asked), 1)]
        asked.append(address)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return asked


async def test_dns_rebinding_is_refused_at_delivery(receiver: Receiver, rebinding_dns: list[str]) -> None:
    url = "http://hooks.example/hook"
    config = WebhookSettings(secret=SECRET)
    await validate_webhook_url(url, config)  # public at submission

    attempts = await deliver(url, config)

    assert rebinding_dns == ["93.184.216.34", "127.0.0.1"]
    assert len(attempts) == 1
    assert "hooks.example resolves to 127.0.0.1, a loopback address" in (attempts[0].error or "")


async def test_a_host_that_does_not_resolve_or_resolves_too_slowly_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "slow.example":
            threading.Event().wait(0.3)  # in the resolver's thread, not on the event loop
        if host in ("slow.example", "missing.example"):
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    config = WebhookSettings(secret=SECRET, timeout_s=0.05)

    with pytest.raises(InvalidRequest, match=r"cannot resolve host 'missing.example' \(Name or service not known\)"):
        await validate_webhook_url("https://missing.example/hook", config)
    with pytest.raises(InvalidRequest, match=r"resolving 'slow.example' took over 0.05s"):
        await validate_webhook_url("https://slow.example/hook", config)


# --- lifecycle and settings --------------------------------------------------------------------


async def test_aclose_waits_for_scheduled_deliveries(receiver: Receiver, url: str) -> None:
    receiver.script(Reply(200, delay_s=0.2))
    recorded: list[WebhookAttempt] = []

    async def on_attempt(attempt: WebhookAttempt) -> None:
        recorded.append(attempt)

    webhooks = WebhookDelivery(settings())
    async with webhooks:
        webhooks.schedule(url, JOB, on_attempt)
        webhooks.schedule(url, JOB, on_attempt)
        assert "running=2" in repr(webhooks)

    assert [a.status_code for a in recorded] == [200, 200]
    assert repr(webhooks) == "<WebhookDelivery closed running=0 delivered=2 failed=0>"


async def test_aclose_cancels_deliveries_past_its_time_limit(
    receiver: Receiver, url: str, caplog: pytest.LogCaptureFixture
) -> None:
    receiver.script(Reply(200, delay_s=0.5))
    webhooks = WebhookDelivery(settings())
    async with webhooks:
        webhooks.schedule(url, JOB)
        await asyncio.sleep(0.05)
        started = time.perf_counter()
        await webhooks.aclose(timeout_s=0.05)

    assert time.perf_counter() - started < 0.3
    assert "cancelled 1 webhook deliveries" in caplog.text


async def test_misuse_raises_a_sentence() -> None:
    webhooks = WebhookDelivery(settings())
    with pytest.raises(RuntimeError, match="use it inside 'async with WebhookDelivery"):
        await webhooks.deliver("http://127.0.0.1/", JOB)
    async with webhooks:
        pass
    with pytest.raises(RuntimeError, match="is closed"):
        webhooks.schedule("http://127.0.0.1/", JOB)
    with pytest.raises(RuntimeError, match="Cannot reopen"):
        await webhooks.__aenter__()


def test_settings_are_validated_with_the_fix_in_the_message() -> None:
    with pytest.raises(ConfigurationError, match="secret must be at least 16 characters"):
        WebhookSettings(secret="short")
    with pytest.raises(ConfigurationError, match="max_attempts must be an integer >= 1, got 0"):
        WebhookSettings(max_attempts=0)
    with pytest.raises(ConfigurationError, match="max_backoff_s must be a number of seconds >= backoff_s"):
        WebhookSettings(backoff_s=2.0, max_backoff_s=1.0)
    assert SECRET not in repr(WebhookSettings(secret=SECRET))


def test_settings_from_env() -> None:
    environ = {
        "ASYNCSERVE_WEBHOOK_SECRET": SECRET,
        "ASYNCSERVE_WEBHOOK_ALLOW_PRIVATE": "true",
        "ASYNCSERVE_WEBHOOK_ALLOWED_HOSTS": "Receiver.internal, [::1]",
        "ASYNCSERVE_WEBHOOK_MAX_ATTEMPTS": "3",
        "ASYNCSERVE_WEBHOOK_TIMEOUT_S": "2.5",
    }

    loaded = WebhookSettings.from_env(environ, backoff_s=0.5)

    hosts = frozenset({"receiver.internal", "::1"})
    expected = WebhookSettings(secret=SECRET, allow_private=True, allowed_hosts=hosts, max_attempts=3, timeout_s=2.5)
    assert loaded == dataclasses.replace(expected, backoff_s=0.5)
    with pytest.raises(ConfigurationError, match="ASYNCSERVE_WEBHOOK_ALLOW_PRIVATE='sure' is not a valid bool"):
        WebhookSettings.from_env({"ASYNCSERVE_WEBHOOK_ALLOW_PRIVATE": "sure"})


async def test_an_httpx_that_keeps_its_pool_elsewhere_is_refused_not_used_unchecked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import httpx

    class PoolElsewhere(httpx.AsyncHTTPTransport):
        """A release whose transport no longer reads ``_pool``: ours would go unused."""

        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self._connections = self.__dict__.pop("_pool")

    monkeypatch.setattr(httpx, "AsyncHTTPTransport", PoolElsewhere)
    with pytest.raises(ConfigurationError, match=r"keeps its connection pool elsewhere.*asyncserve\[client\]"):
        async with WebhookDelivery(settings()):
            pass
