"""Cancel a request's work when its client disconnects, without paying a task for every request.

ASGI tells a handler that its client left only through ``receive()``, which a handler busy awaiting
its result is not calling: noticing a disconnect takes a second task per request that waits in
``receive()``. Creating, waking and cancelling that task cost about as much event-loop time as
decoding a V2 request, for every request, while most inference requests end within milliseconds
(or, fetching features, within tens of them), before a disconnect could save any work. So a request
is watched only once it has run for ``after_s``: one ticker starts the watchers of the requests that old.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable
from typing import TypeVar

from asyncserve.routing import Receive

T = TypeVar("T")


class ClientGone(Exception):
    """The client disconnected before its answer; there is nobody to answer."""


class _Watched:
    __slots__ = ("gone", "receive", "since", "task", "watcher")

    def __init__(self, task: asyncio.Task[object], receive: Receive, since: float) -> None:
        self.task = task
        self.receive = receive
        self.since = since
        self.watcher: asyncio.Task[None] | None = None
        self.gone = False


class DisconnectWatch:
    """Runs handlers so that a client's disconnect cancels its handler (and the work it queued).

    Example::

        watch = DisconnectWatch(after_s=0.25)
        response = await watch.run(handler(request), receive)  # ClientGone if the client left
        await watch.aclose()
    """

    def __init__(self, after_s: float = 0.25) -> None:
        self.after_s = after_s
        self._young: dict[_Watched, None] = {}
        """Requests not watched yet, oldest first (dicts keep insertion order)."""
        self._ticker: asyncio.Task[None] | None = None

    async def run(self, handling: Awaitable[T], receive: Receive) -> T:
        """Await ``handling``; if the client disconnects meanwhile, cancel it and raise :class:`ClientGone`.

        Call it from the request's own task once the request body has been read: afterwards the only
        message ``receive()`` can bring is the disconnect.
        """
        task = asyncio.current_task()
        assert task is not None
        if self._ticker is None:
            self._ticker = asyncio.get_running_loop().create_task(self._tick(), name="asyncserve-disconnect-watch")
        watched = _Watched(task, receive, time.monotonic())
        self._young[watched] = None
        try:
            return await handling
        except asyncio.CancelledError:
            if not watched.gone:
                raise
            task.uncancel()
            raise ClientGone from None
        finally:
            self._young.pop(watched, None)
            if watched.watcher is not None:
                watched.watcher.cancel()

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.after_s / 2)
            cutoff = time.monotonic() - self.after_s
            old = []
            for watched in self._young:
                if watched.since > cutoff:
                    break
                old.append(watched)
            for watched in old:
                del self._young[watched]
                watched.watcher = loop.create_task(_cancel_on_disconnect(watched))

    async def aclose(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None


async def _cancel_on_disconnect(watched: _Watched) -> None:
    # The watcher runs only while the request's task waits, so the cancel lands on the awaited handler.
    while (await watched.receive())["type"] != "http.disconnect":
        pass
    watched.gone = True
    watched.task.cancel()
