"""OpenTelemetry spans of a request and its stages, exported over OTLP when configured; off and free otherwise.

Tracing is on when ``Settings.otlp_endpoint`` (``ASYNCSERVE_OTLP_ENDPOINT``) or the standard
``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` names a collector; it needs the
``otel`` extra. Off, ``tracer`` is None, OpenTelemetry is never imported, and each hook in the request
path costs one attribute check (``if tracing.tracer is not None``); hooks run once per batch return a
shared null context.

The spans of one request, under the W3C ``traceparent`` it came with (if any)::

    asyncserve.request             (SERVER; ended when the answer is written)
    ├── asyncserve.admission       routing, keys, model lookup, decoding, the batcher's admission
    ├── asyncserve.features        one per feature source; its round trip sends traceparent on
    ├── asyncserve.queue_wait      from the batcher's queue to the batch's start
    ├── asyncserve.batch           the batch, under its first request, linked to the others'
    │   └── asyncserve.model       the model's compute (executor or awaited)
    └── asyncserve.prediction_log  the record put into the prediction log's buffer

A batch serves many requests: it is a child of its first live request's span, with a link to each
other request's span, so each trace shows its queue wait and every batch shows whom it served.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, ParamSpec, Protocol, TypeVar

from asyncserve.config import Settings
from asyncserve.exceptions import ConfigurationError

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, Tracer

T = TypeVar("T")
P = ParamSpec("P")

tracer: Tracer | None = None
"""The tracer while tracing is on; None (the default) turns every hook off."""

_OFF: contextlib.nullcontext[None] = contextlib.nullcontext()

OTLP_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")


class Queued(Protocol):
    """What a batch span needs of each of its requests (``runtime.batching.Item``)."""

    arrived: float
    """``time.monotonic()`` when the rows were queued."""
    trace: Any
    """The request's trace context when it was queued (an OpenTelemetry ``Context``), or None."""


# Turning it on and off


def configure(settings: Settings, environ: dict[str, str] | None = None) -> Callable[[], None] | None:
    """Turn tracing on with an OTLP/HTTP exporter if ``settings`` or the environment name a collector.

    Returns what flushes and stops the exporter (blocking: call it off the loop), or None when tracing
    stays as it was (off, unless ``enable`` turned it on).
    """
    environ = dict(os.environ) if environ is None else environ
    if not settings.otlp_endpoint and not any(environ.get(name) for name in OTLP_VARIABLES):
        return None
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        raise ConfigurationError(
            "tracing (an OTLP endpoint is set) needs OpenTelemetry: pip install 'asyncserve[otel]', or unset "
            "ASYNCSERVE_OTLP_ENDPOINT and OTEL_EXPORTER_OTLP_ENDPOINT"
        ) from None
    endpoint = settings.otlp_endpoint
    if endpoint and not endpoint.rstrip("/").endswith("/v1/traces"):
        endpoint = endpoint.rstrip("/") + "/v1/traces"  # as the standard variable is read: a base URL
    exporter = OTLPSpanExporter(endpoint=endpoint) if endpoint else OTLPSpanExporter()
    # Resource.create reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES.
    provider = TracerProvider(
        resource=Resource.create({"service.name": environ.get("OTEL_SERVICE_NAME", "asyncserve")})
    )
    provider.add_span_processor(BatchSpanProcessor(exporter))
    enable(provider)

    def shutdown() -> None:
        disable()
        provider.shutdown()

    return shutdown


def enable(provider: TracerProvider) -> None:
    """Trace requests into ``provider`` (tests give one with an in-memory exporter)."""
    global tracer
    tracer = provider.get_tracer("asyncserve")


def disable() -> None:
    global tracer
    tracer = None


# Hooks of the request path (each called only when ``tracer`` is not None, except the per-batch ones)


def serve_request(
    handle: Callable[[Any, Any], asyncio.Future[Any] | None], request: Any, respond: Callable[[Any, str], None]
) -> asyncio.Future[Any] | None:
    """``HttpApp.handle`` under a request span: the incoming ``traceparent`` is its parent, the span is
    current while the request is admitted (so its tasks and callbacks inherit it), and it ends when
    the answer is given or the client goes away."""
    from opentelemetry import context, propagate, trace

    assert tracer is not None
    parent = propagate.extract(request.headers)
    attributes = {"http.request.method": request.method, "url.path": request.path}
    span = tracer.start_span("asyncserve.request", context=parent, kind=trace.SpanKind.SERVER, attributes=attributes)
    span.set_attribute("asyncserve.request_id", request.request_id)
    request.trace = span
    current = trace.set_span_in_context(span, parent)
    admission = tracer.start_span("asyncserve.admission", context=current)
    token = context.attach(current)
    try:
        work = handle(request, _Responder(span, admission, respond, request))
    finally:
        context.detach(token)
        if admission.is_recording():
            admission.end()
    if work is not None:
        work.add_done_callback(lambda done: _end_cancelled(span) if done.cancelled() else None)
    return work


class _Responder:
    """``respond``, ending the request's span with the answer's status."""

    __slots__ = ("admission", "request", "respond", "span")

    def __init__(self, span: Span, admission: Span, respond: Callable[[Any, str], None], request: Any) -> None:
        self.span, self.admission, self.respond, self.request = span, admission, respond, request

    def __call__(self, response: Any, request_id: str) -> None:
        self.respond(response, request_id)
        from opentelemetry.trace import StatusCode

        if self.admission.is_recording():  # answered while being admitted (an error, a health check)
            self.admission.end()
        span = self.span
        span.set_attribute("http.response.status_code", response.status)
        model = self.request.params.get("model")
        if model:
            span.set_attribute("asyncserve.model", model)
        if response.status >= 500:
            span.set_status(StatusCode.ERROR)
        span.end()


def _end_cancelled(span: Span) -> None:
    if span.is_recording():
        span.set_attribute("asyncserve.cancelled", True)  # the client went away
        span.end()


def current_context() -> Context | None:
    """The running code's trace context, kept with queued rows (their span is the request's); None outside
    any span (a job's rows, say), whose rows then get no queue-wait span."""
    from opentelemetry import context, trace

    current = context.get_current()
    return current if trace.get_current_span(current).get_span_context().is_valid else None


def outgoing_headers(headers: dict[str, str]) -> dict[str, str]:
    """``headers`` with the current trace context's ``traceparent`` (and ``tracestate``) added, for a call out."""
    from opentelemetry import propagate

    carrier = dict(headers)
    propagate.inject(carrier)
    return carrier


async def feature_lookup(source: str, keys: int, lookup: Awaitable[T]) -> T:
    """A request's ``lookup`` in one feature source, under a span current while it runs (so the source's
    round trip, which runs in the context of its first request, sends this span on as its parent)."""
    assert tracer is not None
    attributes: dict[str, str | int] = {"asyncserve.feature_source": source, "asyncserve.keys": keys}
    with tracer.start_as_current_span("asyncserve.features", attributes=attributes):
        return await lookup


def model_span(model: str, run: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """A model's runner that, while tracing is on, runs each batch under an ``asyncserve.model`` span."""

    async def traced(*args: P.args, **kwargs: P.kwargs) -> T:
        if tracer is None:
            return await run(*args, **kwargs)
        with tracer.start_as_current_span("asyncserve.model", attributes={"asyncserve.model": model}):
            return await run(*args, **kwargs)

    return traced


def stage(name: str, **attributes: str | int | float) -> contextlib.AbstractContextManager[Any]:
    """A span named ``name`` around a stage, current while it runs, with ``attributes`` prefixed
    ``asyncserve.``; a shared null context when tracing is off."""
    if tracer is None:
        return _OFF
    return tracer.start_as_current_span(name, attributes={f"asyncserve.{k}": v for k, v in attributes.items()})


def batch(model: str, items: Sequence[Queued], reason: str) -> contextlib.AbstractContextManager[Any]:
    """The span of a batch (current while it runs), and each request's queue wait, ended now."""
    if tracer is None:
        return _OFF
    return _batch(tracer, model, items, reason)


@contextlib.contextmanager
def _batch(tracer: Tracer, model: str, items: Sequence[Queued], reason: str) -> Iterator[None]:
    from opentelemetry import trace

    now_ns, now = time.time_ns(), time.monotonic()
    contexts = [item.trace for item in items if item.trace is not None]
    for item in items:
        if item.trace is not None:
            queued_ns = now_ns - int((now - item.arrived) * 1e9)
            waited = tracer.start_span("asyncserve.queue_wait", context=item.trace, start_time=queued_ns)
            waited.set_attribute("asyncserve.model", model)
            waited.end(end_time=now_ns)
    links = [trace.Link(trace.get_current_span(context).get_span_context()) for context in contexts[1:]]
    attributes: dict[str, str | int] = {
        "asyncserve.model": model,
        "asyncserve.requests": len(items),
        "asyncserve.close_reason": reason,
    }
    parent = contexts[0] if contexts else None
    with tracer.start_as_current_span("asyncserve.batch", context=parent, links=links, attributes=attributes):
        yield
