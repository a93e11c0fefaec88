"""``asyncserve jobs submit``: the real command against a real server, both in processes of their own."""

from __future__ import annotations

import asyncio
import os
import pty
import re
import sys
import termios
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from asyncserve.cli.inputfiles import parse_cell
from tests.processes import REPO, SERVICE, Running, eventually, free_port, launch

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
async def server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Running]:
    """One server for the module, its jobs in a SQLite file of its own."""
    where = tmp_path_factory.mktemp("submit-server")
    env = {"ASYNCSERVE_JOBS": f"sqlite://{where / 'jobs.db'}", "ASYNCSERVE_JOB_CONCURRENCY": "8"}
    async with launch("serve", SERVICE, env=env, log_dir=where) as running:
        yield running


async def start_submit(
    server: Running | str, *args: str | Path, stderr: int = asyncio.subprocess.PIPE
) -> asyncio.subprocess.Process:
    """Start ``asyncserve jobs submit ARGS --url SERVER`` (a server, or a URL)."""
    url = server if isinstance(server, str) else server.url or ""
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "asyncserve", "jobs", "submit", *map(str, args), "--url", url,
        cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=stderr,
    )  # fmt: skip


async def submit(server: Running | str, *args: str | Path) -> tuple[int, str]:
    """Run ``asyncserve jobs submit ARGS --url SERVER``; its exit status and stderr."""
    process = await start_submit(server, *args)
    _, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode is not None
    return process.returncode, stderr.decode()


async def write(path: Path, text: str) -> Path:
    await asyncio.to_thread(path.write_text, text)
    return path


async def results(path: Path) -> dict[int, dict[str, Any]]:
    """The --out file by input line; each line appears once."""
    records = [orjson.loads(line) for line in (await asyncio.to_thread(path.read_text)).splitlines()]
    by_line = {record["line"]: record for record in records}
    assert len(by_line) == len(records), "a line was written twice"
    return by_line


async def test_json_lines_every_result_written_with_its_line_and_failures_reported(
    server: Running, tmp_path: Path
) -> None:
    rows = [{"fail": n in (4, 11)} for n in range(20)]
    lines = [orjson.dumps(row).decode() for row in rows]
    lines[7] = '{"nope": 1}'  # refused at submission: its whole chunk is retried row by row
    lines.insert(10, "")  # a blank line is skipped, and the line numbers still match the file
    source = await write(tmp_path / "inputs.jsonl", "\n".join(lines) + "\n")
    out = tmp_path / "results.jsonl"
    status, stderr = await submit(server, source, "--model", "faulty", "--out", out, "--batch-size", "6",
                                  "--max-attempts", "1")  # fmt: skip
    written = await results(out)
    assert status == 1, stderr
    assert "20 jobs" in stderr
    assert "2 failed, 1 rejected, 17 succeeded" in stderr
    assert "\r" not in stderr, "not a terminal: plain lines, no bar"
    assert "\x1b" not in stderr
    progress = [line for line in stderr.splitlines() if line.startswith("rows ")]
    assert 10 <= len(progress) <= 12, "a line at each tenth of the rows, the first and the last"
    assert re.fullmatch(r"rows 20/20 \(100%\): 17 succeeded, 3 failed; submitted 20; [\d.]+ rows/s; done", progress[-1])
    expected = {number: orjson.loads(line) for number, line in enumerate(lines, 1) if line}
    assert sorted(written) == sorted(expected)
    for number, row in expected.items():
        record = written[number]
        if "nope" in row:
            assert (record["status"], record["id"]) == ("rejected", None)
            assert "nope" in record["error"] or "fail" in record["error"]
        elif row["fail"]:
            assert record["status"] == "failed"
            assert "failed while predicting" in record["error"]
        else:
            assert record["status"] == "succeeded"
            assert record["result"] == {"ok": True}
    assert not await asyncio.to_thread((tmp_path / "results.jsonl.jobs").exists), "a finished run leaves no journal"


async def test_csv_header_names_the_inputs_and_json_list_cells_are_parsed(server: Running, tmp_path: Path) -> None:
    rows = [f'"[{n}, 0, 0]","[1, 1, {n}]"' for n in range(30)]
    source = await write(tmp_path / "inputs.csv", "a,b\n" + "\n".join(rows) + "\n")
    out = tmp_path / "results.jsonl"
    status, stderr = await submit(server, source, "--model", "adder", "--out", out, "--batch-size", "7")
    written = await results(out)
    assert status == 0, stderr
    assert "30 jobs" in stderr
    assert "30 succeeded" in stderr
    assert sorted(written) == list(range(2, 32)), "the header is line 1"
    assert all(written[n + 2]["result"]["total"] == 2.0 * n + 2 for n in range(30))
    assert len({record["id"] for record in written.values()}) == 30


async def test_an_existing_out_file_is_kept_unless_overwrite_is_given(server: Running, tmp_path: Path) -> None:
    row = '{"a": [1, 2, 3], "b": [4, 5, 6]}\n'
    source = await write(tmp_path / "inputs.jsonl", row + row)
    out = await write(tmp_path / "results.jsonl", "an earlier run's results\n")
    refused, refused_err = await submit(server, source, "--model", "adder", "--out", out)
    assert refused == 2
    assert refused_err.splitlines() == [
        f"asyncserve: error: {out} exists already: pass --overwrite to replace it, or another --out"
    ]
    assert await asyncio.to_thread(out.read_text) == "an earlier run's results\n"
    both, both_err = await submit(server, source, "--model", "adder", "--out", out, "--resume", "--overwrite")
    assert both == 2
    assert "not allowed with argument" in both_err
    status, stderr = await submit(server, source, "--model", "adder", "--out", out, "--overwrite")
    assert status == 0, stderr
    assert "2 succeeded" in stderr
    assert sorted(await results(out)) == [1, 2]


async def test_an_interrupted_run_resumes_without_submitting_twice(server: Running, tmp_path: Path) -> None:
    rows = "".join(orjson.dumps({"n": n, "seconds": 0.1}).decode() + "\n" for n in range(40))
    source = await write(tmp_path / "inputs.jsonl", rows)
    out = tmp_path / "results.jsonl"
    interrupted = await start_submit(server, source, "--model", "pid", "--out", out, "--batch-size", "10")
    await eventually(lambda: _has_lines(out, 5), "the first results", timeout_s=20)
    interrupted.kill()
    await interrupted.wait()
    assert 5 <= len(await results(out)) < 40, "killed mid-run"
    refused, stderr = await submit(server, source, "--model", "pid", "--out", out)
    assert refused == 2
    assert "--resume" in stderr
    status, stderr = await submit(server, source, "--model", "pid", "--out", out, "--resume")
    written = await results(out)
    assert status == 0, stderr
    assert "40 succeeded" in stderr
    assert sorted(written) == list(range(1, 41))
    assert [written[n]["result"]["n"] for n in range(1, 41)] == list(range(40))
    async with httpx.AsyncClient(base_url=server.url or "") as client:
        jobs = (await client.get("/v1/jobs", params={"model": "pid", "limit": 1000})).json()["jobs"]
    assert sorted(job["id"] for job in jobs) == sorted(record["id"] for record in written.values())


async def test_a_chunk_accepted_but_not_journaled_is_found_again_on_resume(server: Running, tmp_path: Path) -> None:
    rows = [{"n": n, "seconds": 0.0} for n in range(12)]
    source = await write(tmp_path / "inputs.jsonl", "".join(orjson.dumps(row).decode() + "\n" for row in rows))
    out = tmp_path / "results.jsonl"
    # What a client leaves when it dies between the server's 202 for its first chunk and writing
    # that chunk's ids to the journal: the run's id in the journal, and the jobs on the server.
    run = "5eed0fc0ffee1234"
    await write(out.with_name(out.name + ".jobs"), orjson.dumps({"run": run}).decode() + "\n")
    first = enumerate(rows[:5], 1)
    chunk = [{"model": "pid", "inputs": row, "idempotency_key": f"{run}:{line}"} for line, row in first]
    async with httpx.AsyncClient(base_url=server.url or "") as client:
        accepted = await client.post("/v1/jobs/batch", json=chunk)
    assert accepted.status_code == 202
    status, stderr = await submit(server, source, "--model", "pid", "--out", out, "--resume", "--batch-size", "4")
    written = await results(out)
    assert status == 0, stderr
    assert [written[line]["id"] for line in range(1, 6)] == [job["id"] for job in accepted.json()["jobs"]]
    assert len({record["id"] for record in written.values()}) == 12
    assert [written[line]["result"]["n"] for line in range(1, 13)] == list(range(12))


async def _has_lines(path: Path, count: int) -> bool:
    if not await asyncio.to_thread(path.exists):
        return False
    return len((await asyncio.to_thread(path.read_bytes)).splitlines()) >= count


async def test_an_unknown_model_or_unreadable_file_is_a_clear_error(server: Running, tmp_path: Path) -> None:
    source = await write(tmp_path / "inputs.jsonl", '{"x": 1}\n')
    unknown, unknown_err = await submit(server, source, "--model", "nope", "--out", tmp_path / "out.jsonl")
    missing, missing_err = await submit(server, tmp_path / "nothing.csv", "--model", "adder", "--out", tmp_path / "o")
    assert (unknown, missing) == (2, 2)
    assert "unknown model 'nope'" in unknown_err
    assert "cannot read" in missing_err


async def test_a_server_that_goes_away_and_comes_back_mid_run_runs_every_row_once(tmp_path: Path) -> None:
    rows = "".join(orjson.dumps({"n": n, "seconds": 0.05}).decode() + "\n" for n in range(80))
    source = await write(tmp_path / "inputs.jsonl", rows)
    out = tmp_path / "results.jsonl"
    # Jobs in a SQLite file that outlives the server; a killed server's leases end after 1 s.
    env = {"ASYNCSERVE_JOBS": f"sqlite://{tmp_path / 'jobs.db'}", "ASYNCSERVE_JOB_CONCURRENCY": "4",
           "ASYNCSERVE_JOB_LEASE_S": "1"}  # fmt: skip
    port = free_port()
    async with launch("serve", SERVICE, env=env, log_dir=tmp_path, port=port) as first:
        running = await start_submit(first, source, "--model", "pid", "--out", out, "--batch-size", "5")
        await eventually(lambda: _has_lines(out, 5), "the first results", timeout_s=20)
        first.kill()  # SIGKILL: its connections break, and nothing listens on the port until the restart
    before = len(await results(out))
    async with launch("serve", SERVICE, env=env, log_dir=tmp_path, port=port) as second:
        _, stderr = await asyncio.wait_for(running.communicate(), 60)
        async with httpx.AsyncClient(base_url=second.url or "") as client:
            jobs = (await client.get("/v1/jobs", params={"model": "pid", "limit": 1000})).json()["jobs"]
    written = await results(out)
    assert running.returncode == 0, stderr.decode()
    assert "80 succeeded" in stderr.decode()
    assert 5 <= before < 80, "the server went away mid-run"
    assert sorted(written) == list(range(1, 81)), "every row once"
    assert [written[line]["result"]["n"] for line in range(1, 81)] == list(range(80))
    assert sorted(job["id"] for job in jobs) == sorted(record["id"] for record in written.values()), "no job twice"
    assert {record["result"]["pid"] for record in written.values()} == {first.pid, second.pid}


async def test_a_server_that_is_not_there_fails_fast_with_what_to_check(tmp_path: Path) -> None:
    source = await write(tmp_path / "inputs.jsonl", '{"x": 1}\n')
    url = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    status, stderr = await submit(url, source, "--model", "adder", "--out", tmp_path / "out.jsonl")
    assert status == 2
    assert stderr.splitlines() == [
        f"asyncserve: error: {url} did not answer within 3 s: is the server running, and is --url right?"
    ]
    assert time.monotonic() - started < 10
    assert not await asyncio.to_thread((tmp_path / "out.jsonl").exists)


async def test_on_a_terminal_progress_is_a_bar_with_rows_rate_and_eta(server: Running, tmp_path: Path) -> None:
    rows = "".join(orjson.dumps({"n": n, "seconds": 0.01}).decode() + "\n" for n in range(40))
    source = await write(tmp_path / "inputs.jsonl", rows)
    terminal, stderr = pty.openpty()
    termios.tcsetwinsize(stderr, (24, 120))
    try:
        process = await start_submit(server, source, "--model", "pid", "--out", tmp_path / "o.jsonl", stderr=stderr)
    finally:
        os.close(stderr)  # the command holds the terminal's other end now
    try:
        screen = (await asyncio.wait_for(asyncio.to_thread(_read_until_closed, terminal), 30)).decode()
    finally:
        os.close(terminal)
    assert await asyncio.wait_for(process.wait(), 10) == 0, screen
    frames = [frame for frame in re.split(r"[\r\n]+", screen) if frame.startswith("rows")]
    assert re.fullmatch(r"rows: +0%\|[ ]+\| 0/40 \[00:00<\?, \?.*", frames[0]), frames[0]
    bar = r"rows: 100%\|█+\| 40/40 \[\d\d:\d\d<00:00, +[\d.]+ rows/s, submitted 40, failed 0\]"
    assert re.fullmatch(bar, frames[-1]), frames[-1]
    assert "rows 40/40 (100%)" not in screen, "a bar, not plain lines"
    assert "40 succeeded" in screen


def _read_until_closed(terminal: int) -> bytes:
    """What the command wrote to its terminal, until it closed it (EIO, on Linux)."""
    chunks = []
    while True:
        try:
            chunk = os.read(terminal, 4096)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def test_csv_cells_become_json_values() -> None:
    assert [parse_cell(c) for c in ("3", "-2.5", "1e3", "true", "[1, 2]", '{"a": 1}', "x y", "[oops")] == [
        3, -2.5, 1000.0, True, [1, 2], {"a": 1}, "x y", "[oops",
    ]  # fmt: skip
