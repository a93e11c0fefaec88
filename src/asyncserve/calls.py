"""The calling context of a request: its deadline, and a way for a model to call the service's other models.

A leaf module: the registry, the pipeline and any model (an ensemble, a DAG of models) share it.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Protocol

from asyncserve.tensors import Columns

request_deadline: ContextVar[float] = ContextVar("request_deadline")
"""The current request's absolute deadline on ``time.monotonic()``; unset means no deadline."""


def remaining_s() -> float:
    """Seconds left before the current request's deadline (``inf`` when none is set)."""
    deadline = request_deadline.get(None)
    return math.inf if deadline is None else deadline - time.monotonic()


@contextlib.contextmanager
def deadline_scope(deadline: float) -> Iterator[None]:
    """Run a block under ``deadline`` (monotonic seconds); it can only tighten the one in force.

    Example::

        with deadline_scope(time.monotonic() + 0.5):
            await caller.predict("scorer", columns)  # the registry reads request_deadline
    """
    token = request_deadline.set(min(deadline, request_deadline.get(math.inf)))
    try:
        yield
    finally:
        request_deadline.reset(token)


class ModelCaller(Protocol):
    """Runs a model of the service by name, under the current :data:`request_deadline`."""

    async def predict(self, name: str, columns: Columns, *, version: str | None = None) -> Columns: ...
