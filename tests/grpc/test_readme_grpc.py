"""The README's gRPC example runs as written against the demo served with --grpc-port."""

from __future__ import annotations

import asyncio
import contextlib
import io
import re
from pathlib import Path

from tests.grpc.conftest import serve_grpc

README = (Path(__file__).parents[2] / "README.md").read_text()


def run_block(code: str) -> str:
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "README.md", "exec"), {})
    return printed.getvalue()


async def test_the_readme_grpc_example_answers_what_it_says(tmp_path: Path) -> None:
    (code,) = [
        block for block in re.findall(r"```python\n(.*?)```", README, flags=re.DOTALL) if "tritonclient.grpc" in block
    ]
    assert "localhost:8001" in code
    expected = re.findall(r"^# (.*)$", code, flags=re.MULTILINE)[-1]
    async with serve_grpc(tmp_path, service="asyncserve.demo:service") as served:
        printed = await asyncio.to_thread(run_block, code.replace("localhost:8001", served.grpc_url))
    assert printed.strip() == expected
