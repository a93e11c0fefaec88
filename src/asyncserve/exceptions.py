"""Every error asyncserve raises on purpose, and the HTTP status each one maps to.

    AsyncServeError                     500 internal
    ├── InvalidRequest                  400 invalid_request      malformed body, shape/data mismatch
    │   ├── SchemaViolation             422 schema_violation     a field breaks the declared schema
    │   └── HostNotAllowed              400 host_not_allowed     a Host header the server does not answer to
    ├── Unauthorized                    401 unauthorized         no API key, or a wrong one
    ├── Forbidden                       403 forbidden            the key lacks the route's scope
    ├── IdempotencyConflict             409 idempotency_conflict an idempotency key reused for another job
    ├── NotFound                        404 not_found            unknown route
    │   └── ModelNotFound               404 model_not_found      unknown model or version
    ├── MethodNotAllowed                405 method_not_allowed
    ├── RequestTimeout                  408 request_timeout      the request head came too slowly
    ├── PayloadTooLarge                 413 payload_too_large
    ├── URITooLong                      414 uri_too_long
    ├── ExpectationFailed               417 expectation_failed   an Expect other than 100-continue
    ├── HeadersTooLarge                 431 headers_too_large    too many headers, or too large
    ├── UnsupportedMediaType            415 unsupported_media_type
    ├── RateLimited                     429 rate_limited         over the key's rate or concurrency
    ├── Unavailable                     503 unavailable          (has retry_after_s)
    │   ├── ModelNotReady               503 model_not_ready      still loading, failed, or unloaded
    │   ├── Overloaded                  503 overloaded           queue full, or the deadline cannot be met
    │   └── ShuttingDown                503 shutting_down
    ├── FeatureUnavailable              502 feature_unavailable  a feature source failed (named)
    ├── DeadlineExceeded                504 deadline_exceeded    the request's deadline passed
    │   └── FeatureTimeout              504 feature_timeout      a feature source was too slow (named)
    ├── ModelError                      500 model_error          the model raised; no internals leak
    └── ConfigurationError              (start-up only)          a service or setting is wrong
        └── StartupError                (start-up only)          a component could not start: what, why, the fix

The HTTP layer renders any of them as ``{"error": "<message>", "code": "<code>"}`` with the
status code, the body the Open Inference Protocol prescribes plus a stable machine code; the client
(``asyncserve.AsyncClient``) maps the code back to its class with ``AsyncServeError.for_code``.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar


class AsyncServeError(Exception):
    """Base class of every error asyncserve raises on purpose."""

    status_code: ClassVar[int] = 500
    code: ClassVar[str] = "internal"
    _by_code: ClassVar[dict[str, type[AsyncServeError]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # The first class to declare a code owns it: a later subclass cannot take "overloaded" over.
        if "code" in cls.__dict__:
            AsyncServeError._by_code.setdefault(cls.code, cls)

    @staticmethod
    def for_code(code: str) -> type[AsyncServeError]:
        """The class whose ``code`` is ``code``; AsyncServeError itself for a code no class declares.

        Example::

            AsyncServeError.for_code("overloaded")  # Overloaded
            AsyncServeError.for_code("no_such_code")  # AsyncServeError
        """
        return AsyncServeError._by_code.get(code, AsyncServeError)

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_dict(self) -> dict[str, Any]:
        return {"error": self.message, "code": self.code}

    def headers(self) -> dict[str, str]:
        """Extra response headers this error asks for."""
        return {}


class InvalidRequest(AsyncServeError):
    """The request body is malformed, or its data does not match its declared shape."""

    status_code = 400
    code = "invalid_request"


class SchemaViolation(InvalidRequest):
    """A field of the body breaks the schema; the message starts with the field's path."""

    status_code = 422
    code = "schema_violation"

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}" if path else problem)
        self.path = path


class HostNotAllowed(InvalidRequest):
    code = "host_not_allowed"


class NotFound(AsyncServeError):
    status_code = 404
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class IdempotencyConflict(AsyncServeError):
    status_code = 409
    code = "idempotency_conflict"


class Unauthorized(AsyncServeError):
    status_code = 401
    code = "unauthorized"

    def headers(self) -> dict[str, str]:
        return {"www-authenticate": 'Bearer realm="asyncserve"'}


class Forbidden(AsyncServeError):
    status_code = 403
    code = "forbidden"


class RateLimited(AsyncServeError):
    status_code = 429
    code = "rate_limited"

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(f"{message}; retry after {retry_after_s:.2g} s")
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"retry-after": str(max(1, math.ceil(self.retry_after_s)))}


class MethodNotAllowed(AsyncServeError):
    status_code = 405
    code = "method_not_allowed"

    def __init__(self, message: str, *, allowed: list[str]) -> None:
        super().__init__(message)
        self.allowed = allowed

    def headers(self) -> dict[str, str]:
        return {"allow": ", ".join(self.allowed)}


class RequestTimeout(AsyncServeError):
    status_code = 408
    code = "request_timeout"


class PayloadTooLarge(AsyncServeError):
    status_code = 413
    code = "payload_too_large"


class URITooLong(AsyncServeError):
    status_code = 414
    code = "uri_too_long"


class ExpectationFailed(AsyncServeError):
    status_code = 417
    code = "expectation_failed"


class HeadersTooLarge(AsyncServeError):
    status_code = 431
    code = "headers_too_large"


class UnsupportedMediaType(AsyncServeError):
    status_code = 415
    code = "unsupported_media_type"


class Unavailable(AsyncServeError):
    """The server cannot take this request now; retrying after ``retry_after_s`` may work."""

    status_code = 503
    code = "unavailable"

    def __init__(self, message: str, *, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        # Retry-After takes whole seconds; round up so a client never retries too early.
        return {"retry-after": str(max(1, int(-(-self.retry_after_s // 1))))}


class ModelNotReady(Unavailable):
    code = "model_not_ready"


class Overloaded(Unavailable):
    """The model's queue is full, or the work ahead means the request's deadline cannot be met."""

    code = "overloaded"


class ShuttingDown(Unavailable):
    code = "shutting_down"


class DeadlineExceeded(AsyncServeError):
    status_code = 504
    code = "deadline_exceeded"


class FeatureTimeout(DeadlineExceeded):
    """A feature source did not answer in time; the message names the source."""

    code = "feature_timeout"


class FeatureUnavailable(AsyncServeError):
    """A feature source failed (error, circuit open); the message names the source."""

    status_code = 502
    code = "feature_unavailable"


class ModelError(AsyncServeError):
    """The model's own code raised. The message names the model, never the exception's text."""

    status_code = 500
    code = "model_error"


class ConfigurationError(AsyncServeError):
    """A service, model declaration or setting is wrong; raised at start-up, before serving."""

    code = "configuration_error"


class StartupError(ConfigurationError):
    """A component could not start: the message is ``<component>: <cause>; <fix>``, one line.

    Example::

        raise StartupError("job broker redis://db:6379/0", "connection refused", "start Redis there")
    """

    code = "startup_error"

    def __init__(self, component: str, cause: str, fix: str) -> None:
        cause = " ".join(cause.split()).rstrip(".") or "failed"
        super().__init__(f"{component}: {cause}; {fix}")
        self.component, self.cause, self.fix = component, cause, fix
