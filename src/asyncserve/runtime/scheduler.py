"""Fair scheduling of an executor's workers between models.

Every model's batcher asks the scheduler for a worker before it forms a batch, and gives the worker
back, with the seconds its batch computed, when the batch ends. The pool itself then never queues:
a batch that is handed to it has a worker, so a cheap model's batch never waits in the pool behind
a queue of a heavy model's batches.

Two rules decide who gets a free worker:
- **Fair order.** Models waiting for a worker are served by weighted fair queuing on measured
  compute: each model's *virtual time* advances by the seconds its batches computed divided by its
  ``weight``, and the waiting model with the least virtual time goes first. A cheap model's batches
  add little, so it goes first whenever it has work: it waits for at most one batch of the others.
  A model that comes back after an idle spell starts at the least virtual time among the others,
  so it cannot bank credit while idle.
- **A worker kept for others.** By default no model takes the last free worker while another model
  that runs nothing has been active within ``recent_s`` (work waiting, or a batch ended): the
  other model's next batch then starts at once instead of behind a whole batch of the greedy one.
  Once the others have been idle for ``recent_s``, a model may use every worker.

A model's own ``max_concurrent_batches`` (its ``cap``) bounds its workers in every case.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Mapping
from typing import Any


class Share:
    """One model's use of a scheduler's workers: ask with ``acquire``, give back with ``release``."""

    def __init__(self, scheduler: WorkerScheduler, label: str, weight: float, cap: int) -> None:
        self.scheduler = scheduler
        self.label = label
        self.weight = weight
        self.cap = cap
        """Most workers this model may hold at once."""
        self.running = 0
        """Workers this model holds now."""
        self.virtual_s = 0.0
        """Compute seconds given to this model so far, divided by its weight (as corrected on return from idle)."""
        self.compute_s = 0.0
        """Compute seconds its batches took in all (a counter)."""
        self.last_active = -math.inf
        """When this model last asked for a worker or gave one back (``time.monotonic()``)."""
        self.waiter: asyncio.Future[None] | None = None
        self.running_until: Mapping[Any, float] = {}
        """When each of its running batches is expected to end (``time.monotonic()``), kept by its batcher."""
        self._busy_decayed_s = 0.0
        self._busy_at = 0.0

    def acquire(self) -> asyncio.Future[None] | None:
        """A worker for one batch: None when granted at once, else a future that completes when granted.

        Cancelling the future withdraws the request (a worker granted meanwhile is given back).
        """
        return self.scheduler.acquire(self)

    def release(self, compute_s: float) -> None:
        """Give the worker back; ``compute_s`` is how long the batch ran in it."""
        self.scheduler.release(self, compute_s)

    def expected_wait_s(self) -> float:
        """Roughly how long a batch of this model would wait for a worker if it asked now."""
        return self.scheduler.expected_wait_s(self)

    def executor_share(self, now: float | None = None) -> float:
        """The fraction of the scheduler's workers this model kept busy lately (decayed over ``SHARE_WINDOW_S``)."""
        now = time.monotonic() if now is None else now
        busy = self._busy_decayed_s * math.exp(-(now - self._busy_at) / SHARE_WINDOW_S)
        return busy / (SHARE_WINDOW_S * self.scheduler.workers)

    def _count_busy(self, compute_s: float, now: float) -> None:
        self._busy_decayed_s = self._busy_decayed_s * math.exp(-(now - self._busy_at) / SHARE_WINDOW_S) + compute_s
        self._busy_at = now

    def __repr__(self) -> str:
        return f"Share({self.label!r}, weight={self.weight}, cap={self.cap}, running={self.running})"


SHARE_WINDOW_S = 10.0
"""The time constant of ``Share.executor_share``: recent use weighs most."""


class WorkerScheduler:
    """Hands ``workers`` workers to models' batchers in a fair order (see the module's docstring)."""

    def __init__(self, workers: int, *, recent_s: float = 0.25, clock: Callable[[], float] = time.monotonic) -> None:
        self.workers = workers
        self.recent_s = recent_s
        self.busy = 0
        self._clock = clock
        self._shares: list[Share] = []
        self._waiting: list[Share] = []

    def share(self, label: str, *, weight: float = 1.0, cap: int | None = None) -> Share:
        """Register a model; ``cap`` defaults to every worker."""
        share = Share(self, label, weight, min(cap or self.workers, self.workers))
        self._shares.append(share)
        return share

    def acquire(self, share: Share) -> asyncio.Future[None] | None:
        if share.waiter is not None:
            raise RuntimeError(f"model {share.label!r} already waits for a worker")
        now = self._clock()
        self._wake(share, now)
        share.last_active = now
        if not self._waiting and self._may_run(share, now):
            self._grant(share)
            return None
        waiter = share.waiter = asyncio.get_running_loop().create_future()
        waiter.add_done_callback(lambda future: self._withdrawn(share, future))
        self._waiting.append(share)
        self._hand_over(now)
        return waiter

    def release(self, share: Share, compute_s: float) -> None:
        now = self._clock()
        self.busy -= 1
        share.running -= 1
        share.compute_s += compute_s
        share.virtual_s += compute_s / share.weight
        share.last_active = now
        share._count_busy(compute_s, now)
        self._hand_over(now)

    def expected_wait_s(self, share: Share) -> float:
        """Roughly how long ``share`` would wait for a worker now: until the next running batch ends.

        Fair order puts a model that computed less first, so the next worker to free up is taken to be its.
        """
        if self.busy == 0:
            return 0.0  # every worker free (asked per request between batches: the cheap answer first)
        now = self._clock()
        if self._may_run(share, now):
            return 0.0
        ends = [end for other in self._shares for end in other.running_until.values()]
        return max(0.0, min(ends) - now) if ends else 0.0

    # Deciding

    def _may_run(self, share: Share, now: float) -> bool:
        free = self.workers - self.busy
        if share.running >= share.cap or free <= 0:
            return False
        return free > 1 or not self._kept_for_others(share, now)

    def _kept_for_others(self, share: Share, now: float) -> bool:
        """Whether another model that runs nothing was active lately: the last free worker is kept for it."""
        if self.workers == 1:
            return False
        return any(
            other is not share
            and other.running == 0
            and (other.waiter is not None or now - other.last_active < self.recent_s)
            for other in self._shares
        )

    def _hand_over(self, now: float) -> None:
        while self._waiting and self.busy < self.workers:
            eligible = [share for share in self._waiting if self._may_run(share, now)]
            if not eligible:
                return
            chosen = min(eligible, key=lambda share: share.virtual_s)
            self._waiting.remove(chosen)
            waiter, chosen.waiter = chosen.waiter, None
            self._grant(chosen)
            if waiter is not None:
                waiter.set_result(None)

    def _grant(self, share: Share) -> None:
        self.busy += 1
        share.running += 1

    def _wake(self, share: Share, now: float) -> None:
        """A model back from idle starts at the least virtual time of the active ones: no credit for idling."""
        if share.running or now - share.last_active < self.recent_s:
            return
        active = [s.virtual_s for s in self._shares if s is not share and (s.running or s.waiter is not None)]
        if active:
            share.virtual_s = max(share.virtual_s, min(active))

    def _withdrawn(self, share: Share, waiter: asyncio.Future[None]) -> None:
        if not waiter.cancelled():
            return
        if share.waiter is waiter:  # still waiting: leave the queue
            share.waiter = None
            self._waiting.remove(share)
        self._hand_over(self._clock())

    def __repr__(self) -> str:
        return f"WorkerScheduler(workers={self.workers}, busy={self.busy}, waiting={[s.label for s in self._waiting]})"
