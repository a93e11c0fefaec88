"""Where CPU-bound ``predict`` functions run: a thread pool or a process pool, never the event loop.

Both executors share one contract: work whose deadline has passed by the time a worker picks it
up is not started, and a caller that stops waiting (deadline or disconnect) withdraws work that
is still queued.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import pickle
import time
from collections.abc import Callable, Generator, Sequence
from concurrent.futures import Executor as FuturesExecutor
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Protocol, TypeVar

from asyncserve.exceptions import ConfigurationError, DeadlineExceeded, ModelError
from asyncserve.model import Model, ModelSpec, call_predict, check_outputs, describe, warm_up
from asyncserve.runtime import lifeline
from asyncserve.tensors import Columns

T = TypeVar("T")
Prediction = tuple[Columns, float, float]
"""The checked outputs, the seconds predict took, and the seconds the work waited for a worker first."""


class Executor(Protocol):
    workers: int
    """How many predictions can run at once."""

    async def start(self, specs: Sequence[ModelSpec]) -> None:
        """Load and warm up every (sync) model; raises if one fails."""

    async def reload(self, spec: ModelSpec) -> None:
        """Load one model again (after an unload or a failed load)."""

    async def run(self, spec: ModelSpec, columns: Columns, rows: int, deadline: float) -> Prediction:
        """Predict a batch unless ``deadline`` (``time.monotonic()``) passes first."""

    async def aclose(self) -> None:
        """Let running predictions finish, drop queued ones, release the workers."""


def predict_unless_expired(
    spec: ModelSpec, columns: Columns, rows: int, deadline: float, submitted: float
) -> Prediction:
    # Checked when a worker picks the work up: it may have waited in the pool's queue (behind other
    # models' batches), a wait that is the pool's, not the model's (``submitted``: time.monotonic()).
    picked = time.monotonic()
    if picked >= deadline:
        raise DeadlineExceeded(f"the deadline passed before model {spec.label!r} could start")
    started = time.perf_counter()
    outputs = check_outputs(spec, call_predict(spec, columns), rows)
    return outputs, time.perf_counter() - started, max(0.0, picked - submitted)


def load_and_warm(spec: ModelSpec, threads_per_call: int = 0) -> None:
    spec.model.load()
    if threads_per_call:
        limit_native_threads(threads_per_call)
    warm_up(spec)


def limit_native_threads(threads: int) -> None:
    """Cap the thread pools of the native libraries loaded so far (OpenBLAS, MKL, OpenMP) at ``threads``.

    Executor workers compute at once; a BLAS that also starts a thread per core in each of them
    oversubscribes the cores, and OpenBLAS then slows down by tens of times (seen: the demo's
    MiniLM at two workers, 0.17 s a row against 0.03 s). After ``load()``, so that libraries a model
    loads are capped too. These limits are per process.
    """
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=threads)


async def await_until(future: asyncio.Future[T], spec: ModelSpec, deadline: float) -> T:
    """Await pool work; past the deadline, withdraw it (if still queued) and raise DeadlineExceeded.

    A bare timer that cancels the future rather than ``asyncio.timeout()``, which costs several
    times more and is paid on every batch: at low load, every request.
    """
    loop = asyncio.get_running_loop()
    timer = loop.call_at(loop.time() + (deadline - time.monotonic()), _expire, future)
    try:
        return await future
    except asyncio.CancelledError as cancelled:
        if cancelled.args != (_EXPIRED,):
            raise  # the caller was cancelled, not the work expired
        raise DeadlineExceeded(f"model {spec.label!r} did not answer before the request's deadline") from None
    finally:
        timer.cancel()


_EXPIRED = "asyncserve: past the deadline"
"""The message a future cancelled by ``await_until``'s timer carries."""


def _expire(future: asyncio.Future[Any]) -> None:
    future.cancel(_EXPIRED)


class ThreadExecutor:
    """Runs predict in a thread pool: right for NumPy, ONNX Runtime, torch, which release the GIL."""

    def __init__(self, workers: int, *, name: str = "predict", threads_per_call: int = 0) -> None:
        self.workers = workers
        self._threads_per_call = threads_per_call
        """Threads a predict call's native libraries may use (0: as they like)."""
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix=f"asyncserve-{name}")

    async def start(self, specs: Sequence[ModelSpec]) -> None:
        await asyncio.gather(*(self.reload(spec) for spec in specs))

    async def reload(self, spec: ModelSpec) -> None:
        await self._submit(load_and_warm, spec, self._threads_per_call)

    async def run(self, spec: ModelSpec, columns: Columns, rows: int, deadline: float) -> Prediction:
        future = self._submit(predict_unless_expired, spec, columns, rows, deadline, time.monotonic())
        return await await_until(future, spec, deadline)

    def _submit(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        # loop.run_in_executor, without its check that fn is no coroutine function (inspect, per batch).
        return asyncio.wrap_future(self._pool.submit(fn, *args))

    async def aclose(self) -> None:
        await asyncio.to_thread(self._pool.shutdown, wait=True, cancel_futures=True)

    async def step(self, generator: Generator[Any, None, None]) -> tuple[bool, Any]:
        """One part of a streaming model's answer, computed in the pool (see ``runtime/streaming.py``)."""
        return await self._submit(_next_part, generator)

    async def close_generator(self, generator: Generator[Any, None, None]) -> None:
        await self._submit(generator.close)

    def __repr__(self) -> str:
        return f"ThreadExecutor(workers={self.workers})"


def _next_part(generator: Generator[Any, None, None]) -> tuple[bool, Any]:
    try:
        return True, next(generator)
    except StopIteration:
        return False, None


# State of a worker process of ProcessExecutor: its own loaded copy of every model, and the
# start-up barrier (synchronisation objects reach a worker only by inheritance, at its start).
_worker_specs: dict[tuple[str, str | None], ModelSpec] = {}
_worker_barrier: Any = None


def _load_in_worker(models: list[Model], barrier: Any, server_pid: int, threads_per_call: int) -> None:
    global _worker_barrier
    _worker_barrier = barrier
    lifeline.follow_parent(server_pid, lifeline.exit_now)  # a server killed with SIGKILL leaves no pool behind
    for model in models:
        spec = describe(model)
        load_and_warm(spec, threads_per_call)
        _worker_specs[spec.key] = spec


def _predict_in_worker(
    key: tuple[str, str | None], columns: Columns, rows: int, deadline: float, submitted: float
) -> Prediction:
    # (time.monotonic() is one clock for every process of the machine.)
    return predict_unless_expired(_worker_specs[key], columns, rows, deadline, submitted)


def _check_picklable(spec: ModelSpec) -> None:
    try:
        pickle.dumps(spec.model)
    except Exception as exc:
        raise ConfigurationError(
            f"model {spec.label!r} cannot be sent to worker processes ({exc}); define its class at module level, "
            "create locks, clients and weights in load() rather than __init__, or use --executor thread"
        ) from None


def _wait_for_all_workers(timeout_s: float) -> int:
    # Each call blocks until every worker holds one, so N calls prove N workers finished loading.
    _worker_barrier.wait(timeout_s)
    return os.getpid()


class ProcessExecutor:
    """Runs predict in worker processes, each loading every model once: for code that holds the GIL.

    Models travel to the workers pickled before ``load()``, so their classes must be importable
    (defined at module level), as with any ``multiprocessing`` code.
    """

    def __init__(self, workers: int, *, load_timeout_s: float = 600.0, threads_per_call: int = 0) -> None:
        self.workers = workers
        self._threads_per_call = threads_per_call
        self._load_timeout_s = load_timeout_s
        self._pool: ProcessPoolExecutor | None = None
        self._models: list[Model] = []
        self._restart_lock = asyncio.Lock()

    async def start(self, specs: Sequence[ModelSpec]) -> None:
        for spec in specs:
            _check_picklable(spec)
        self._models = [spec.model for spec in specs]
        await self._start_pool()

    async def reload(self, spec: ModelSpec) -> None:
        # Every worker loaded every model at start-up; they stay loaded, so the model simply serves again.
        if spec.model not in self._models:
            raise ModelError(f"model {spec.label!r} was not loaded by the worker processes at start-up")

    async def _start_pool(self) -> None:
        # Made in a thread: the barrier's shared memory and spawning the processes (which the pool
        # does on submit, until it has them all) take blocking system calls.
        self._pool, loaded = await asyncio.to_thread(self._new_pool)
        try:
            await asyncio.gather(*(asyncio.wrap_future(future) for future in loaded))
        except BrokenProcessPool:
            raise ModelError("a worker process failed to load the models; see its log above") from None

    def _new_pool(self) -> tuple[ProcessPoolExecutor, list[Future[int]]]:
        # spawn, not fork: forking a process that runs an event loop and threads is unsafe.
        context = multiprocessing.get_context("spawn")
        barrier = context.Barrier(self.workers)
        pool = ProcessPoolExecutor(
            self.workers,
            mp_context=context,
            initializer=_load_in_worker,
            initargs=(self._models, barrier, os.getpid(), self._threads_per_call),
        )
        return pool, [pool.submit(_wait_for_all_workers, self._load_timeout_s) for _ in range(self.workers)]

    async def run(self, spec: ModelSpec, columns: Columns, rows: int, deadline: float) -> Prediction:
        pool = self._pool
        try:
            future = self._submit(_predict_in_worker, spec.key, columns, rows, deadline, time.monotonic())
            return await await_until(future, spec, deadline)
        except BrokenProcessPool:
            # A worker died (killed, out of memory, a crash in native code): replace the pool.
            await self._restart(pool)
            raise ModelError(f"the worker process running model {spec.label!r} died; the pool was restarted") from None

    async def _restart(self, broken: ProcessPoolExecutor | None) -> None:
        async with self._restart_lock:
            if self._pool is not broken or broken is None:
                return  # another caller already replaced it
            self._pool = None
            broken.shutdown(wait=False, cancel_futures=True)
            await self._start_pool()

    def _submit(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        pool: FuturesExecutor | None = self._pool
        if pool is None:
            raise ModelError("the process pool is not running")
        return asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    async def aclose(self) -> None:
        if self._pool is not None:
            # Handed over in a list the thread empties: the pool's last reference dies there, and with it
            # the finalizers of its queues and barrier, which write to the resource tracker (blocking).
            holder, self._pool = [self._pool], None
            await asyncio.to_thread(_shut_down, holder)

    def __repr__(self) -> str:
        return f"ProcessExecutor(workers={self.workers})"


def _shut_down(holder: list[ProcessPoolExecutor]) -> None:
    holder.pop().shutdown(wait=True, cancel_futures=True)
