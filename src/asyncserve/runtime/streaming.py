"""Streaming models: a ``predict`` that yields its answer part by part.

A part is what one ``yield`` gives: the outputs for every row of the request, checked against the
model's declaration like a whole answer. A request's stream is pulled: the next part is computed
only when the previous one has been handed on, so a client that reads slowly pauses the model
(nothing piles up), and one that goes away stops it at its next step. A sync generator steps in
the executor, one ``next()`` per part, so the event loop never runs model code; an async generator
steps on the loop. The request's deadline covers the whole stream.

Example::

    class Tokens(Model):
        inputs = {"prompt": Tensor("BYTES")}
        outputs = {"token": Tensor("BYTES")}

        def predict(self, prompt):
            for word in prompt[0].split():
                yield {"token": [word]}
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Generator
from enum import StrEnum
from typing import Any, Protocol

from asyncserve.exceptions import AsyncServeError, DeadlineExceeded, InvalidRequest, ModelError, Overloaded
from asyncserve.model import ModelSpec, call_predict, check_outputs
from asyncserve.tensors import Columns

logger = logging.getLogger(__name__)


class StreamEnd(StrEnum):
    """How a stream ended, as ``asyncserve_streams_total`` counts it."""

    COMPLETED = "completed"
    FAILED = "failed"
    DEADLINE = "deadline"
    CLIENT_GONE = "client_gone"


class Stepper(Protocol):
    """Steps a sync generator off the event loop (the thread executor)."""

    async def step(self, generator: Generator[Any, None, None]) -> tuple[bool, Any]:
        """The generator's next value, as ``(True, value)``, or ``(False, None)`` once it is exhausted."""

    async def close_generator(self, generator: Generator[Any, None, None]) -> None:
        """Close the generator where it runs (its ``finally`` blocks run there)."""


class StreamMetrics(Protocol):
    def part(self) -> None: ...

    def ended(self, how: StreamEnd) -> None: ...


class Streams:
    """A model's streams: at most ``limit`` at once (more are refused 503), each a checked iterator of parts."""

    def __init__(self, spec: ModelSpec, stepper: Stepper, metrics: StreamMetrics, *, limit: int) -> None:
        self.spec = spec
        self.stepper = stepper
        self.metrics = metrics
        self.limit = limit
        self.open = 0
        self._closing: set[asyncio.Task[None]] = set()
        """Sync generators being closed after their stream ended: each waits for its step under way."""

    async def aclose(self) -> None:
        """Wait for the generators being closed (before the executor they close in goes)."""
        if self._closing:
            await asyncio.wait(self._closing)

    def start(self, columns: Columns, rows: int, deadline: float) -> AsyncIterator[Columns]:
        """The parts of one request's answer; close the iterator to stop the model at its next step."""
        if rows > self.spec.max_batch_size:
            raise InvalidRequest(
                f"the request has {rows} rows but model {self.spec.label!r} streams the answer to at most "
                f"{self.spec.max_batch_size} per call; send one request per row"
            )
        if self.open >= self.limit:
            raise Overloaded(
                f"model {self.spec.label!r} streams {self.open} answers, its limit; retry later", retry_after_s=1.0
            )
        if time.monotonic() >= deadline:
            raise DeadlineExceeded(f"the deadline passed before model {self.spec.label!r} could start")
        self.open += 1
        return self._parts(columns, rows, deadline)

    async def _parts(self, columns: Columns, rows: int, deadline: float) -> AsyncGenerator[Columns, None]:
        how = StreamEnd.CLIENT_GONE  # unless it ends otherwise: closed early, its reader went away
        try:
            async for part in self._steps(columns, deadline):
                self.metrics.part()
                yield check_outputs(self.spec, part, rows)
            how = StreamEnd.COMPLETED
        except DeadlineExceeded:
            how = StreamEnd.DEADLINE
            raise
        except AsyncServeError:
            how = StreamEnd.FAILED
            raise
        except Exception as exc:
            how = StreamEnd.FAILED
            logger.error("model %s failed while streaming", self.spec.label, exc_info=exc)
            raise ModelError(
                f"model {self.spec.label!r} failed while streaming; the server log has the details"
            ) from exc
        finally:
            self.open -= 1
            self.metrics.ended(how)

    def _steps(self, columns: Columns, deadline: float) -> AsyncIterator[Any]:
        generator = call_predict(self.spec, columns)
        if self.spec.is_async:
            return _async_steps(generator, self.spec, deadline)
        return self._sync_steps(generator, deadline)

    async def _sync_steps(self, generator: Generator[Any, None, None], deadline: float) -> AsyncIterator[Any]:
        loop = asyncio.get_running_loop()
        stepping: asyncio.Future[tuple[bool, Any]] | None = None
        try:
            while True:
                left_s = deadline - time.monotonic()
                if left_s <= 0:
                    raise _past_deadline(self.spec)
                stepping = loop.create_task(self.stepper.step(generator))
                try:
                    # Shielded: a step under way runs to its end in its thread, whatever happens here.
                    more, part = await asyncio.wait_for(asyncio.shield(stepping), left_s)
                except TimeoutError:
                    raise _past_deadline(self.spec) from None
                stepping = None
                if not more:
                    return
                yield part
        finally:
            # A step under way cannot be stopped in its thread: the generator is closed once it is done.
            task = loop.create_task(self._close_when_done(stepping, generator), name="asyncserve-close-stream")
            self._closing.add(task)
            task.add_done_callback(self._closed)

    async def _close_when_done(
        self, stepping: asyncio.Future[tuple[bool, Any]] | None, generator: Generator[Any, None, None]
    ) -> None:
        if stepping is not None:
            with contextlib.suppress(BaseException):
                await stepping  # the step's own thread finishes it; its result is not wanted
        await self.stepper.close_generator(generator)

    def _closed(self, task: asyncio.Task[None]) -> None:
        self._closing.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("closing a stream of model %s failed", self.spec.label, exc_info=task.exception())


def _past_deadline(spec: ModelSpec) -> DeadlineExceeded:
    return DeadlineExceeded(f"model {spec.label!r} did not finish its answer before the deadline")


async def _async_steps(generator: AsyncGenerator[Any, None], spec: ModelSpec, deadline: float) -> AsyncIterator[Any]:
    loop = asyncio.get_running_loop()
    try:
        while True:
            try:
                async with asyncio.timeout_at(loop.time() + (deadline - time.monotonic())):
                    part = await anext(generator)
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise _past_deadline(spec) from None
            yield part
    finally:
        await generator.aclose()  # its finally blocks run now, on the loop
