"""A raw ModelInferResponse written by hand (``asyncserve.grpc.wire``) is the message protobuf writes."""

from __future__ import annotations

import asyncio
import sys

from tests.processes import REPO


async def test_hand_written_answers_are_protobufs_own() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.grpc.wire_check", cwd=REPO,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    output, _ = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, output.decode()
    assert output.decode().strip() == "187 encodings checked"
