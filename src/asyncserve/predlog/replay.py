"""Replaying the spill file into the sink, in the background, once the sink takes writes again."""

from __future__ import annotations

import asyncio
import logging
import random
from pathlib import Path

from asyncserve.predlog.delivery import Delivery

logger = logging.getLogger(__name__)


class Replayer:
    """Stores in the sink what was spilled (now, or by an earlier run), without holding up new records.

    ``run()`` is a task of the logger's; ``wake()`` says there may be something to replay (the
    logger started, or a batch was spilled). A round opens the sink if it never opened, and, if
    it is failing, checks that it answers (``Delivery.probe``): from then on the writer writes to
    it again. Then it claims the spill file (``SpillFile.claims``) and replays each claim from its
    end, a chunk of ``batch_size`` records at a time, cutting the claim after each stored chunk;
    the replay's chunks and the writer's batches take turns. While the sink is failing, and after
    a round that failed, the next round waits ``interval_s`` (scaled by a random factor in [0.5, 1]).

    Example::

        replayer = Replayer(delivery, batch_size=500, interval_s=1.0)
        task = asyncio.create_task(replayer.run())
        replayer.wake()
    """

    def __init__(self, delivery: Delivery, *, batch_size: int, interval_s: float) -> None:
        self._delivery = delivery
        self._batch_size = batch_size
        self._interval_s = interval_s
        self._wanted = asyncio.Event()

    def wake(self) -> None:
        self._wanted.set()

    async def run(self) -> None:
        while True:
            await self._wanted.wait()
            self._wanted.clear()
            await self._until_replayed()

    async def _until_replayed(self) -> None:
        while True:
            if self._delivery.sink_failing:
                await asyncio.sleep(self._pause_s())
            if await self._round():
                return
            if not self._delivery.sink_failing:  # a chunk the sink refused, quickly: do not hammer it
                await asyncio.sleep(self._pause_s())

    def _pause_s(self) -> float:
        return self._interval_s * random.uniform(0.5, 1.0)

    async def _round(self) -> bool:
        """Open the sink if need be and replay every claim: True once nothing is left to replay."""
        delivery = self._delivery
        if not await delivery.ensure_open():
            return False
        if delivery.sink_failing and not await delivery.probe():
            return False
        while claims := await delivery.spill_file.claims():
            for claim in claims:
                if not await self._replay(claim):
                    return False
        return True

    async def _replay(self, claim: Path) -> bool:
        spill = self._delivery.spill_file
        replayed = 0
        while True:
            offset, records = await spill.tail(claim, self._batch_size)
            if records and not await self._delivery.replay(records):
                return False
            replayed += len(records)
            if await spill.cut(claim, offset):
                logger.info("prediction log %s: replayed %d spilled records from %s", self._name, replayed, claim)
                return True

    @property
    def _name(self) -> str:
        return self._delivery.sink.name
