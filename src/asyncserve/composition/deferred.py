"""Deferred predictions: the handles of ``Prefer: lazy`` requests, computed when first read
(:class:`DeferredPredictions`), and :class:`LazyPrediction`, such a handle in Python (``await service.lazy(...)``).
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass
from typing import Any, Protocol

from asyncserve.composition.caches import checked_ttl
from asyncserve.composition.coalescing import Coalescer
from asyncserve.composition.keys import request_key
from asyncserve.exceptions import ConfigurationError, NotFound, Unavailable
from asyncserve.tensors import Columns

logger = logging.getLogger(__name__)

Compute = Callable[[], Awaitable[Columns]]


@dataclass(frozen=True)
class Handle:
    """A deferred prediction: its URL-safe ``id``, its model, and when it expires (``time.monotonic()`` seconds)."""

    id: str
    expires_at: float
    model_label: str

    def remaining_s(self) -> float:
        return max(0.0, self.expires_at - time.monotonic())


class LazyPrediction:
    """A deferred prediction in Python: ``await`` it for its outputs, computed on the first await and
    kept until the handle expires; concurrent and later awaits share that one computation.

    The handle is the same as one made by ``POST /v1/models/{m}/predict`` with ``Prefer: lazy``: it
    can also be read over HTTP at ``url`` (``GET /v1/predictions/{id}``), and both ways share the result.

    Example::

        handle = service.lazy("churn", {"customer_id": 42})  # checked now, computed later (or never)
        if looks_risky:
            outputs = await handle  # {"p": array([...], dtype=float32)}
    """

    def __init__(self, handle: Handle, resolve: Callable[[str], Awaitable[Columns]]) -> None:
        self.handle = handle
        self._resolve = resolve

    @property
    def id(self) -> str:
        return self.handle.id

    @property
    def url(self) -> str:
        return f"/v1/predictions/{self.handle.id}"

    def __await__(self) -> Generator[Any, None, Columns]:
        return self._resolve(self.handle.id).__await__()

    def __repr__(self) -> str:
        return (
            f"LazyPrediction({self.handle.model_label!r}, id={self.id!r}, expires_in_s={self.handle.remaining_s():.0f})"
        )


class LazyPredictor(Protocol):
    """What answers ``Service.lazy``: the server running the service, which binds itself at start-up."""

    def lazy(self, model: str, inputs: Any, version: str | None) -> LazyPrediction: ...


@dataclass(eq=False)
class _Deferred:
    handle: Handle
    key: str
    state: Compute | Columns
    tried_when_idle: bool = False
    """How to compute the outputs until they are computed, then the outputs (the closure is let go)."""


class DeferredPredictions:
    """Handles for ``Prefer: lazy``: a prediction computed when first read, then kept until it expires.

    Concurrent first reads share one computation (through the coalescer, keyed by :func:`request_key`,
    so a shared coalescer also joins them to identical live requests). A failed computation is not
    kept: the readers get the error and the next read tries again. At most ``max_handles`` live
    handles; past that, ``create`` answers ``Unavailable`` (503).

    Example::

        deferred = DeferredPredictions(max_handles=10_000)
        handle = deferred.create("iris", columns, lambda: pipeline_run(columns), ttl_s=600.0)
        outputs = await deferred.resolve(handle.id)  # computed now, kept for the next reads
    """

    def __init__(self, *, max_handles: int = 10_000, coalescer: Coalescer[Columns] | None = None) -> None:
        if max_handles < 1:
            raise ConfigurationError(f"DeferredPredictions: max_handles must be an integer >= 1, got {max_handles!r}")
        self.max_handles = max_handles
        self.coalescer: Coalescer[Columns] = coalescer if coalescer is not None else Coalescer()
        self._entries: dict[str, _Deferred] = {}
        self.created = self.resolved = self.expired = 0

    def __len__(self) -> int:
        return len(self._entries)

    def create(self, model_label: str, columns: Columns, compute: Compute, ttl_s: float) -> Handle:
        """Register a prediction to compute on first read; ``compute`` should take its deadline when it runs."""
        checked_ttl("DeferredPredictions.create", ttl_s)
        if len(self._entries) >= self.max_handles and not self.sweep():
            soonest = min(entry.handle.expires_at for entry in self._entries.values())
            raise Unavailable(
                f"{self.max_handles} deferred predictions are waiting to be read, the most this server keeps; "
                "read some or retry once they expire",
                retry_after_s=max(1.0, soonest - time.monotonic()),
            )
        handle = Handle(secrets.token_urlsafe(16), time.monotonic() + ttl_s, model_label)
        try:
            key = request_key(model_label, columns)
        except TypeError:
            key = f"handle:{handle.id}"  # inputs without a canonical encoding: this handle shares with no one
        self._entries[handle.id] = _Deferred(handle, key, compute)
        self.created += 1
        return handle

    async def resolve(self, handle_id: str) -> Columns:
        """The handle's outputs, computed now if this is the first read; ``NotFound`` if unknown or expired."""
        entry = self._live(handle_id)
        if isinstance(entry.state, dict):
            return entry.state
        result = await self.coalescer.run(entry.key, entry.state)
        if not isinstance(entry.state, dict):  # concurrent first readers all get here; keep and count it once
            entry.state = result
            self.resolved += 1
        return result

    def get(self, handle_id: str) -> Handle:
        """The live handle ``handle_id`` (to learn its model before resolving); ``NotFound`` otherwise."""
        return self._live(handle_id).handle

    def _live(self, handle_id: str) -> _Deferred:
        entry = self._entries.get(handle_id)
        if entry is not None and entry.handle.expires_at <= time.monotonic():
            del self._entries[handle_id]
            self.expired += 1
            entry = None
        if entry is None:
            raise NotFound(f"prediction handle {handle_id!r} is unknown or expired")
        return entry

    def sweep(self) -> int:
        """Forget the expired handles and their results; returns how many."""
        now = time.monotonic()
        gone = [handle_id for handle_id, entry in self._entries.items() if entry.handle.expires_at <= now]
        for handle_id in gone:
            del self._entries[handle_id]
        self.expired += len(gone)
        return len(gone)

    async def compute_when_idle(self, limit: int = 1) -> int:
        """Compute up to ``limit`` unread handles, oldest first (call it when the server is idle).

        Returns how many were computed; a failure is logged and left for the reader to retry (it is
        not tried again when idle).
        """
        pending = [e for e in self._entries.values() if not isinstance(e.state, dict) and not e.tried_when_idle]
        computed = 0
        for entry in pending[:limit]:
            entry.tried_when_idle = True
            handle_id = entry.handle.id
            try:
                await self.resolve(handle_id)
            except NotFound:
                continue  # expired meanwhile
            except Exception:
                logger.warning("computing deferred prediction %s while idle failed", handle_id, exc_info=True)
                continue
            computed += 1
        return computed

    def __repr__(self) -> str:
        return (
            f"DeferredPredictions(live={len(self)}, created={self.created}, resolved={self.resolved}, "
            f"expired={self.expired})"
        )
