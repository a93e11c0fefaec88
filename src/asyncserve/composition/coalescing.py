"""Single flight: identical requests in flight share one computation (:class:`Coalescer`)."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from asyncserve._utils import settle

T = TypeVar("T")


class _Flight(Generic[T]):
    def __init__(self, future: asyncio.Future[T]) -> None:
        self.future = future
        self.waiters = 0


class Coalescer(Generic[T]):
    """Single flight: identical keys in flight share one computation.

    The first caller of a key (the leader) starts the computation; callers of the same key until it
    finishes share it. Everyone gets its result, or its exception. A waiter that is cancelled leaves
    alone; the computation is cancelled only when every waiter has left.

    Example::

        coalescer: Coalescer[Columns] = Coalescer()
        outputs = await coalescer.run(request_key("iris", columns), lambda: registry.predict(...))
    """

    def __init__(self) -> None:
        self._flights: dict[str, _Flight[T]] = {}
        self.leaders = 0
        self.coalesced = 0

    @property
    def in_flight(self) -> int:
        return len(self._flights)

    async def run(self, key: str, compute: Callable[[], Awaitable[T]]) -> T:
        """Await ``compute()`` (run as a task by the leader), or the computation of ``key`` in flight."""
        # The task runs in a copy of the leader's context: the leader's deadline is the flight's.
        waiter, _ = self.join(key, lambda: asyncio.ensure_future(compute()))
        return await waiter

    def join(self, key: str, start: Callable[[], asyncio.Future[T]]) -> tuple[asyncio.Future[T], bool]:
        """This caller's future for ``key``'s result, and whether it leads: with no computation of
        ``key`` in flight, ``start()`` starts one. Cancelling the future leaves the flight; the last
        to leave cancels it. Needs no task, so a request can join without waiting for a turn of the loop.
        """
        flight = self._flights.get(key)
        leads = flight is None
        if flight is None:
            flight = self._flights[key] = _Flight(start())
            flight.future.add_done_callback(functools.partial(self._landed, key, flight))
            self.leaders += 1
        else:
            self.coalesced += 1
        flight.waiters += 1
        waiter: asyncio.Future[T] = flight.future.get_loop().create_future()
        flight.future.add_done_callback(functools.partial(settle, waiter))
        waiter.add_done_callback(functools.partial(self._left, key, flight))
        return waiter, leads

    def _left(self, key: str, flight: _Flight[T], waiter: asyncio.Future[T]) -> None:
        flight.waiters -= 1
        if flight.waiters == 0 and not flight.future.done():
            # Everyone left. Forget the flight first, so that a new caller starts afresh rather
            # than joining a computation that is being cancelled.
            self._forget(key, flight)
            flight.future.cancel()

    def _landed(self, key: str, flight: _Flight[T], future: asyncio.Future[T]) -> None:
        self._forget(key, flight)
        if not future.cancelled():
            future.exception()  # every waiter got it; mark it retrieved so asyncio does not log it again

    def _forget(self, key: str, flight: _Flight[T]) -> None:
        if self._flights.get(key) is flight:
            del self._flights[key]

    def __repr__(self) -> str:
        return f"Coalescer(in_flight={self.in_flight}, leaders={self.leaders}, coalesced={self.coalesced})"
