"""gRPC status codes, and the error that ends a call with one.

The codes are the protocol's (grpc/doc/statuscodes.md), so that this package needs no grpcio.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence


class StatusCode(enum.IntEnum):
    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class GrpcError(Exception):
    """Ends a call with ``code`` and ``message`` (the ``grpc-message`` trailer), plus ``trailers``."""

    def __init__(self, code: StatusCode, message: str, trailers: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.trailers = tuple(trailers)
