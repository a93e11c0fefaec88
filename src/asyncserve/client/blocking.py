"""``Client``: the AsyncClient's API, blocking, for code without an event loop (scripts, notebooks, threads).

Each Client runs an AsyncClient on an event loop of its own, in a thread of its own; a method call
hands its coroutine to that loop and waits for the result. The behaviour (pooling, retries,
deadlines, errors) is therefore the AsyncClient's, exactly. A Client may be shared by threads:
their calls run concurrently on the one loop.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Generator, Sequence
from types import TracebackType
from typing import Any, Concatenate, ParamSpec, Self, TypeVar, overload

from asyncserve.client.asyncclient import AsyncClient, JSONObject, LazyHandle, Row

P = ParamSpec("P")
T = TypeVar("T")


def _blocking(
    method: Callable[Concatenate[AsyncClient, P], Coroutine[Any, Any, T]],
) -> Callable[Concatenate[Client, P], T]:
    """The AsyncClient's ``method``, run on the Client's loop; the caller waits for its result."""

    @functools.wraps(method)
    def call(self: Client, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return self._run(method(self._client, *args, **kwargs))

    return call


def _blocking_iterator(
    method: Callable[Concatenate[AsyncClient, P], AsyncIterator[T]],
) -> Callable[Concatenate[Client, P], Generator[T, None, None]]:
    """The AsyncClient's async iterator ``method`` as a generator: each item waited for in turn; ``close()``
    (or leaving a ``with contextlib.closing(...)`` block) closes the stream."""

    @functools.wraps(method)
    def call(self: Client, /, *args: P.args, **kwargs: P.kwargs) -> Generator[T, None, None]:
        return self._iterate(method(self._client, *args, **kwargs))

    return call


class Client:
    """A client of an asyncserve server that blocks: the :class:`AsyncClient`'s methods, without ``await``.

    Takes the AsyncClient's arguments. Streams (``stream``, ``events``) are iterators; ``lazy``
    returns a :class:`BlockingLazyHandle`, whose ``result()`` reads the prediction. Close it (or use
    ``with``) to stop its thread.

    Usage::

        import asyncserve
        import numpy as np

        with asyncserve.Client("http://localhost:8000") as client:
            answer = client.predict("iris", {"features": [5.1, 3.5, 1.4, 0.2]})
            outputs = client.infer("scaler", {"x": np.ones((2, 3), np.float32)})
            job = client.wait(client.submit("iris", {"features": [5.1, 3.5, 1.4, 0.2]})["id"], timeout_s=60)
            for part in client.stream("countdown", {"start": 3}):
                print(part)
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout_s: float = 30.0,
        retries: int = 3,
        max_connections: int = 256,
        retry_budget_s: float | None = None,
    ) -> None:
        self._client = AsyncClient(
            base_url,
            api_key=api_key,
            timeout_s=timeout_s,
            retries=retries,
            max_connections=max_connections,
            retry_budget_s=retry_budget_s,
        )
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="asyncserve-client", daemon=True)
        self._thread.start()
        self._closed = False

    def __repr__(self) -> str:
        return repr(self._client).replace("AsyncClient", "Client", 1)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close every connection and stop the client's thread; the client cannot be used again."""
        if self._closed:
            return
        try:
            self._run(self._client.aclose())
        finally:
            self._closed = True
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()

    def _run(self, work: Coroutine[Any, Any, T]) -> T:
        if self._closed:
            work.close()
            raise RuntimeError("this Client is closed; make a new one to send more requests")
        if threading.current_thread() is self._thread:
            work.close()
            raise RuntimeError("a Client method was called from its own event loop; in async code use AsyncClient")
        future = asyncio.run_coroutine_threadsafe(work, self._loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # the caller gave up (KeyboardInterrupt, say): so does the request
            raise

    def _iterate(self, items: AsyncIterator[T]) -> Generator[T, None, None]:
        try:
            while True:
                try:
                    yield self._run(_next(items))
                except StopAsyncIteration:
                    return
        finally:
            self._close_stream(items)

    def _close_stream(self, items: AsyncIterator[Any]) -> None:
        """Close a stream left early (the server sees the client go); waited for unless on the loop's own thread."""
        if self._closed:
            return
        closing = asyncio.run_coroutine_threadsafe(_aclose(items), self._loop)
        if threading.current_thread() is not self._thread:  # the garbage collector may finish an iterator there
            closing.result()

    # The API: the AsyncClient's methods, blocking.

    @overload
    def predict(
        self, model: str, rows: Row, *, deadline_s: float | None = None, priority: int | None = None
    ) -> JSONObject: ...

    @overload
    def predict(
        self, model: str, rows: Sequence[Row], *, deadline_s: float | None = None, priority: int | None = None
    ) -> list[JSONObject]: ...

    def predict(
        self, model: str, rows: Row | Sequence[Row], *, deadline_s: float | None = None, priority: int | None = None
    ) -> JSONObject | list[JSONObject]:
        """``POST /v1/models/{model}/predict``; see :meth:`AsyncClient.predict`."""
        any_rows: Any = rows  # the AsyncClient's overloads told apart here already
        answer: JSONObject | list[JSONObject] = self._run(
            self._client.predict(model, any_rows, deadline_s=deadline_s, priority=priority)
        )
        return answer

    def lazy(self, model: str, rows: Row | Sequence[Row]) -> BlockingLazyHandle:
        """A handle to a prediction computed when read: ``handle.result()``; see :meth:`AsyncClient.lazy`."""
        return BlockingLazyHandle(self, self._run(self._client.lazy(model, rows)))

    infer = _blocking(AsyncClient.infer)
    model_metadata = _blocking(AsyncClient.model_metadata)
    submit = _blocking(AsyncClient.submit)
    submit_many = _blocking(AsyncClient.submit_many)
    get = _blocking(AsyncClient.get)
    cancel = _blocking(AsyncClient.cancel)
    wait = _blocking(AsyncClient.wait)
    events = _blocking_iterator(AsyncClient.events)
    stream = _blocking_iterator(AsyncClient.stream)


class BlockingLazyHandle:
    """A :class:`LazyHandle` for a :class:`Client`: ``result()`` reads the prediction, computing it the first time."""

    def __init__(self, client: Client, handle: LazyHandle) -> None:
        self.id = handle.id
        self.url = handle.url
        self.expires_in_s = handle.expires_in_s
        self._client = client
        self._handle = handle

    def __repr__(self) -> str:
        return repr(self._handle).replace("LazyHandle", "BlockingLazyHandle", 1)

    def result(self) -> Any:
        """The answer (a dict, or a list for a list of rows)."""
        return self._client._run(self._handle.result())


async def _next(items: AsyncIterator[T]) -> T:
    return await anext(items)


async def _aclose(items: AsyncIterator[Any]) -> None:
    close = getattr(items, "aclose", None)
    if close is not None:
        await close()
