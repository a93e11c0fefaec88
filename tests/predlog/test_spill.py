"""The spill file: durable appends, claims handed over between processes, replay from the end with cuts."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from asyncserve.predlog import LogRecord
from asyncserve.predlog.spill import SpillFile
from tests.predlog.conftest import record


def encoded(*indexes: int) -> list[LogRecord]:
    return [LogRecord.encode(record(i)) for i in indexes]


async def files(directory: Path) -> list[str]:
    return sorted(await asyncio.to_thread(os.listdir, directory))


async def replay_all(spill: SpillFile, chunk: int) -> list[list[str]]:
    """Replay every claim, as the logger does; the chunks' request ids, in the order taken."""
    chunks = []
    for claim in await spill.claims():
        while True:
            offset, records = await spill.tail(claim, chunk)
            chunks.append([r.request_id for r in records])
            if await spill.cut(claim, offset):
                break
    return chunks


async def test_a_claim_is_replayed_from_its_end_and_shrinks_to_nothing(tmp_path: Path) -> None:
    spill = SpillFile(tmp_path / "spill.jsonl")
    await spill.append(encoded(0, 1, 2))
    await spill.append(encoded(3, 4))
    [claim] = await spill.claims()
    assert await files(tmp_path) == [claim.name]  # the spill file was renamed: new appends start a new one

    sizes = []
    while True:
        offset, records = await spill.tail(claim, 2)
        sizes.append((offset, [r.request_id for r in records]))
        if await spill.cut(claim, offset):
            break
    assert [ids for _, ids in sizes] == [["r3", "r4"], ["r1", "r2"], ["r0"]]
    assert sizes[0][0] > sizes[1][0] > sizes[2][0] == 0
    assert await files(tmp_path) == []


async def test_appends_after_a_claim_go_to_a_new_spill_file(tmp_path: Path) -> None:
    path = tmp_path / "spill.jsonl"
    writer, replayer = SpillFile(path), SpillFile(path)  # as two processes would: each its own descriptor
    await writer.append(encoded(0))
    [claim] = await replayer.claims()
    await writer.append(encoded(1))  # its descriptor still points at the claimed file: it must reopen
    assert [[r.request_id for r in (await replayer.tail(claim, 10))[1]]] == [["r0"]]
    assert await replay_all(replayer, 10) == [["r0"], ["r1"]]
    await writer.aclose()


async def test_the_claim_of_a_live_process_is_left_alone_and_a_dead_ones_taken_over(tmp_path: Path) -> None:
    path = tmp_path / "spill.jsonl"
    line = LogRecord.encode(record(7)).json + b"\n"
    live = path.with_name(f"spill.jsonl.replay-{os.getppid()}-aaaa")
    dead_pid = await asyncio.to_thread(_a_dead_pid)
    dead = path.with_name(f"spill.jsonl.replay-{dead_pid}-bbbb")
    await asyncio.to_thread(live.write_bytes, line)
    await asyncio.to_thread(dead.write_bytes, line)

    claims = await SpillFile(path).claims()
    assert len(claims) == 1
    assert claims[0].name.startswith(f"spill.jsonl.replay-{os.getpid()}-")  # renamed to ours
    assert set(await files(tmp_path)) == {live.name, claims[0].name}


def _a_dead_pid() -> int:
    process = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, check=True)
    return int(process.stdout)


async def test_a_torn_last_line_is_skipped_and_blank_lines_ignored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "spill.jsonl"
    whole = b"".join(r.json + b"\n" for r in encoded(0, 1))
    await asyncio.to_thread(path.write_bytes, whole + b"\n" + b'{"request_id": "r2", "mod')
    assert await replay_all(SpillFile(path), 10) == [["r0", "r1"]]
    assert "skipping a line that is not a record" in caplog.text


async def test_a_chunk_holds_whole_lines_even_when_they_are_long(tmp_path: Path) -> None:
    path = tmp_path / "spill.jsonl"
    big = [LogRecord.encode(record(i, inputs={"blob": "x" * 300_000})) for i in range(3)]
    spill = SpillFile(path)
    await spill.append(big)
    assert await replay_all(spill, 2) == [["r1", "r2"], ["r0"]]


async def test_records_keep_their_log_id_through_the_spill_file(tmp_path: Path) -> None:
    path = tmp_path / "spill.jsonl"
    spill = SpillFile(path)
    written = encoded(0, 1)
    legacy = orjson.dumps(record(2))  # a line spilled by a version without log ids
    await spill.append(written)
    await asyncio.to_thread(_append_bytes, path, legacy + b"\n")
    [claim] = await spill.claims()
    _, records = await spill.tail(claim, 10)
    assert [r.log_id for r in records[:2]] == [r.log_id for r in written]
    assert records[2].log_id == LogRecord.decode(legacy).log_id != ""  # the same id every time it is read
    assert records[2].request_id == "r2"


def _append_bytes(path: Path, data: bytes) -> None:
    with path.open("ab") as file:
        file.write(data)
