"""The worker processes of one server (``--workers N``), and one ``/metrics`` for all of them.

The kernel hands each connection to any worker, so a scrape that saw only the worker it reached
would jump from one worker's counts to another's. The supervisor gives every worker its index and
a directory of the group; each worker answers on a Unix socket there (``worker-<i>.sock``) with its
own exposition, and the worker that gets ``GET /metrics`` asks the others and returns every
worker's samples, each labelled ``worker="<i>"`` (``sum without (worker) (...)`` adds them up).
The dashboard's summary (``GET /ui/summary``) gathers every worker's report the same way: the asker
names what it wants in one line (``metrics`` or ``summary``) and reads the answer to the end.
A worker that does not answer in time, such as one being restarted, is left out and counted in
``asyncserve_metrics_workers_missing``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)

ASK_TIMEOUT_S = 1.0
"""How long a scrape waits for another worker's exposition."""

METRICS, SUMMARY = b"metrics", b"summary"
"""What a worker asks another for: its Prometheus exposition, or its dashboard report."""


@dataclass(frozen=True)
class WorkerGroup:
    """Where this worker stands among the server's workers."""

    directory: Path
    index: int
    size: int

    def socket_path(self, index: int) -> Path:
        return self.directory / f"worker-{index}.sock"


class MetricsPeers:
    """This worker's socket for the others' scrapes, and the scrape that asks them all."""

    def __init__(self, group: WorkerGroup, exposition: Callable[[], bytes]) -> None:
        self.group, self._exposition = group, exposition
        self._summary: Callable[[], bytes] = lambda: b"{}"
        self._server: asyncio.Server | None = None

    def answer_summaries(self, summary: Callable[[], bytes]) -> None:
        """Give ``summary()`` (this worker's dashboard report, JSON) to the other workers that ask."""
        self._summary = summary

    async def start(self) -> None:
        """Listen for the other workers' scrapes; a failure costs them this worker's metrics, not the worker."""
        path = self.group.socket_path(self.group.index)
        try:
            await asyncio.to_thread(path.unlink, missing_ok=True)  # left by the worker this one replaces
            self._server = await asyncio.start_unix_server(self._answer, path)
        except OSError as exc:  # a path too long for a Unix socket (a deep TMPDIR), a full disk
            logger.warning("worker %d cannot give its metrics to the others at %s: %s", self.group.index, path, exc)

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
            await asyncio.to_thread(self.group.socket_path(self.group.index).unlink, missing_ok=True)

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, TimeoutError):
            async with asyncio.timeout(ASK_TIMEOUT_S):
                wanted = (await reader.readline()).strip()
            writer.write(self._summary() if wanted == SUMMARY else self._exposition())
            await writer.drain()
        writer.close()

    async def exposition(self) -> bytes:
        """Every worker's metrics, labelled by worker; the ones that did not answer are counted."""
        found = await self._ask_all(METRICS, self._exposition)
        # Parsing a few thousand lines would hold the event loop for milliseconds.
        return await asyncio.to_thread(merge, found, self.group.size - len(found))

    async def summaries(self) -> dict[int, bytes]:
        """Every worker's dashboard report that came in time, by worker index (this one's included)."""
        return await self._ask_all(SUMMARY, self._summary)

    async def _ask_all(self, wanted: bytes, mine: Callable[[], bytes]) -> dict[int, bytes]:
        others = [index for index in range(self.group.size) if index != self.group.index]
        answers = await asyncio.gather(*(self._ask(index, wanted) for index in others))
        texts = {self.group.index: mine(), **dict(zip(others, answers, strict=True))}
        return {index: text for index, text in texts.items() if text is not None}

    async def _ask(self, index: int, wanted: bytes) -> bytes | None:
        try:
            async with asyncio.timeout(ASK_TIMEOUT_S):
                reader, writer = await asyncio.open_unix_connection(self.group.socket_path(index))
                try:
                    writer.write(wanted + b"\n")
                    return await reader.read()
                finally:
                    writer.close()
        except (OSError, TimeoutError) as exc:
            logger.debug("worker %d did not give its metrics: %r", index, exc)
            return None


def merge(expositions: dict[int, bytes], missing: int) -> bytes:
    """One exposition of every worker's samples, each labelled ``worker="<i>"``."""
    families: dict[str, Metric] = {}
    for index, text in sorted(expositions.items()):
        for family in text_string_to_metric_families(text.decode()):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
            worker = str(index)
            merged.samples += [sample._replace(labels={**sample.labels, "worker": worker}) for sample in family.samples]
    gauge = GaugeMetricFamily(
        "asyncserve_metrics_workers_missing", "Workers whose metrics this scrape lacks: they did not answer in time."
    )
    gauge.add_metric([], missing)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families([*families.values(), gauge]))
    return generate_latest(registry)


class _Families(Collector):
    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)
