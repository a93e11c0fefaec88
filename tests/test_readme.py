"""The README's shell and Python examples, run as written, answer what the README says they answer.

Every ```bash and ```python block is claimed by one test (``RUN_BY``; a test checks that none is left
out). The one change made to an example is the port: the tests listen on a free one, where the
README says 8000 (as it says itself for ``make demo PORT=9000``). Shell examples run in bash, with the
real ``curl`` against a real server.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import types
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from asyncserve import Service
from asyncserve.config import Settings
from asyncserve.demo import IrisClassifier
from asyncserve.demo import service as demo
from tests.conftest import RunningServer, serving
from tests.processes import eventually, free_port, launch

REPO = Path(__file__).parent.parent
README = (REPO / "README.md").read_text()
VENV = Path(sys.executable).parent.parent

RUN_BY = {
    "make demo    #": "tests.test_readme:test_the_setup_commands_are_make_targets",
    "localhost:8000/v1/models/iris/predict -H 'Content-Type": "tests.test_readme:test_the_demo_answers_the_iris_curl",
    "class Scaler": "tests.test_readme:test_the_readme_service_serves_with_the_readme_command_and_curl",
    ".venv/bin/asyncserve serve service:service": (
        "tests.test_readme:test_the_readme_service_serves_with_the_readme_command_and_curl"
    ),
    "asyncserve.serve(service": "tests.test_readme:test_serving_from_python_serves_then_makes_the_asgi_app",
    "class Countdown": "tests.test_readme:test_the_streaming_service_streams_the_curl_as_the_readme_says",
    "curl -sN": "tests.test_readme:test_the_streaming_service_streams_the_curl_as_the_readme_says",
    "from asyncserve import Client": "tests.test_client:test_the_readme_client_examples_run_and_answer_what_they_say",
    "from asyncserve import AsyncClient": (
        "tests.test_client:test_the_readme_client_examples_run_and_answer_what_they_say"
    ),
    'Authorization: Bearer $KEY"': "tests.test_readme:test_a_key_made_as_the_readme_says_opens_the_readme_curl",
    "class Encoder(Model)": "tests.test_readme:test_the_capacity_example_serves_its_two_models",
    "import tritonclient.grpc": "tests.grpc.test_readme_grpc:test_the_readme_grpc_example_answers_what_it_says",
}
"""A text only one README example holds -> the test that runs it."""


def examples(language: str) -> list[str]:
    """The README's blocks in ``language``, indented ones (in a list) included, dedented."""
    fenced = re.findall(rf"^( *)```{language}\n(.*?)^\1```", README, flags=re.DOTALL | re.MULTILINE)
    return [textwrap.dedent(indent + code) if indent else code for indent, code in fenced]


def example(marker: str, language: str = "python") -> str:
    (found,) = [block for block in examples(language) if marker in block]
    return found


def at_port(text: str, port: int) -> str:
    return text.replace("localhost:8000", f"localhost:{port}").replace("8000", str(port))


def commands(block: str) -> list[str]:
    """The block's commands, a line each once continuations are joined (its ``#`` lines are what they print)."""
    joined = re.sub(r"\\\n\s*", "", block)
    return [line for line in joined.splitlines() if line.strip() and not line.startswith("#")]


def printed(block: str) -> str:
    """What the block says its command prints: its ``# `` line."""
    (line,) = [line for line in block.splitlines() if line.startswith("# ")]
    return line.removeprefix("# ")


async def bash(command: str, cwd: Path = REPO, env: dict[str, str] | None = None) -> str:
    process = await asyncio.create_subprocess_exec(
        "bash", "-c", command, cwd=cwd, env={**os.environ, **(env or {})},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, f"{command!r} exited {process.returncode}: {err.decode()}"
    return out.decode()


def port_of(running: RunningServer) -> int:
    return int(running.url.rpartition(":")[2])


def test_every_shell_and_python_example_is_run() -> None:
    blocks = examples("bash") + examples("python")
    assert len(blocks) == 12
    for block in blocks:
        claims = [marker for marker in RUN_BY if marker in block]
        assert len(claims) == 1, f"no test (or more than one) runs this README example:\n{block}"
        module, _, test = RUN_BY[claims[0]].partition(":")
        assert callable(getattr(importlib.import_module(module), test)), RUN_BY[claims[0]]


def test_the_setup_commands_are_make_targets() -> None:
    for command in commands(example("make demo    #", "bash")):
        target = command.split("#")[0].split()
        assert target[0] == "make"
        # -n prints the commands without running them (nor the set-up they may need first).
        subprocess.run(["make", "-n", *target[1:]], cwd=REPO, capture_output=True, timeout=30, check=True)


def test_the_readme_says_how_to_pick_the_demo_port_and_make_uses_it() -> None:
    match = re.search(r"`make demo PORT=(\d+)`", README)
    assert match, "the README does not say how to run the demo on another port"
    port = match.group(1)
    planned = subprocess.run(
        ["make", "-n", "demo", f"PORT={port}"], cwd=REPO, capture_output=True, text=True, timeout=30, check=True
    )
    assert f".venv/bin/asyncserve demo --port {port}\n" in planned.stdout


@pytest.fixture(scope="module")
async def demo_server() -> AsyncIterator[RunningServer]:
    async with serving(demo) as running:
        yield running


async def test_the_demo_answers_the_iris_curl(demo_server: RunningServer) -> None:
    block = example("/v1/models/iris/predict -H 'Content-Type", "bash")
    (command,) = commands(block)
    answer = json.loads(await bash(at_port(command, port_of(demo_server))))
    said = json.loads(printed(block))
    assert answer["label"] == said["label"] == "setosa"
    assert answer["probabilities"] == pytest.approx(said["probabilities"], abs=1e-4)


async def plain_install(directory: Path) -> None:
    """``python -m venv .venv && .venv/bin/pip install REPO`` in ``directory``: asyncserve with no extras."""
    venv = directory / ".venv"
    for command in ([sys.executable, "-m", "venv", str(venv)], [str(venv / "bin" / "pip"), "install", "-q", str(REPO)]):
        process = await asyncio.create_subprocess_exec(
            *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        _, err = await asyncio.wait_for(process.communicate(), 300)
        assert process.returncode == 0, f"{command} exited {process.returncode}: {err.decode()[-2000:]}"


@pytest.mark.parametrize("install", ["make's venv, every extra", "a clean venv, plain pip install ."])
async def test_the_readme_service_serves_with_the_readme_command_and_curl(tmp_path: Path, install: str) -> None:
    # As a user would: service.py in the directory they work in, beside a .venv.
    await asyncio.to_thread((tmp_path / "service.py").write_text, example("class Scaler"))
    if install.startswith("make's"):
        await asyncio.to_thread((tmp_path / ".venv").symlink_to, VENV)
    else:
        await plain_install(tmp_path)
    port = free_port()
    serve, curl = commands(at_port(example(".venv/bin/asyncserve serve service:service", "bash"), port))
    server = await asyncio.create_subprocess_exec(
        "bash", "-c", f"exec {serve}", cwd=tmp_path, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    try:
        await _wait_ready(port, server)
        answer = await bash(curl, cwd=tmp_path)
    finally:
        server.send_signal(signal.SIGTERM)
        await asyncio.wait_for(server.wait(), 30)
    assert json.loads(answer) == json.loads(printed(example(".venv/bin/asyncserve serve", "bash")))
    assert server.returncode == 0


async def test_serving_from_python_serves_then_makes_the_asgi_app(tmp_path: Path) -> None:
    # The block serves until a signal, then makes the ASGI app: both run, in that order, as written.
    port = free_port()
    program = (
        example("class Scaler")
        + at_port(example("asyncserve.serve(service"), port)
        + "\nprint(type(application).__name__)\n"
    )
    server = await asyncio.create_subprocess_exec(
        sys.executable, "-c", program, cwd=tmp_path, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        await _wait_ready(port, server)
        async with httpx.AsyncClient(base_url=f"http://localhost:{port}") as client:
            answer = await client.post("/v1/models/scaler/predict", json={"x": [1, 2, 3]})
    finally:
        server.send_signal(signal.SIGINT)
        out, err = await asyncio.wait_for(server.communicate(), 30)
    assert answer.json() == {"y": [1.0, 20.0, 300.0]}
    assert server.returncode == 0, err.decode()
    assert out.decode().splitlines()[-1] == "AsgiApp"


async def test_the_streaming_service_streams_the_curl_as_the_readme_says() -> None:
    module = types.ModuleType("readme_streaming")
    exec(compile(example("class Countdown"), "README.md", "exec"), module.__dict__)
    block = example("curl -sN", "bash")
    (command,) = commands(block)
    async with serving(module.__dict__["service"]) as running:
        events = (await bash(at_port(command, port_of(running)))).strip().split("\n\n")
    assert events[:4] == [f'data: {{"left":{n}}}' for n in (3, 2, 1, 0)]
    assert events[4].startswith("event: end")
    assert printed(block) == 'data: {"left":3} ... data: {"left":0}, then event: end'


async def test_a_key_made_as_the_readme_says_opens_the_readme_curl(tmp_path: Path) -> None:
    made = re.search(r"`(asyncserve keys new alice --scopes infer,jobs --file keys.txt)`", README)
    assert made, "the README no longer makes a key this way"
    printed_key = await bash(f"{VENV}/bin/{made.group(1)}", cwd=tmp_path)
    key = printed_key.splitlines()[1]
    settings = Settings(jobs="memory://", api_keys_file=str(tmp_path / "keys.txt"))
    (command,) = commands(example('Authorization: Bearer $KEY"', "bash"))
    async with serving(Service(IrisClassifier(), name="keyed"), settings) as running:
        refused = await bash(at_port(command, port_of(running)), env={"KEY": "wrong"})
        answer = await bash(at_port(command, port_of(running)), env={"KEY": key})
    assert json.loads(refused)["code"] == "unauthorized"
    assert json.loads(answer)["label"] == "setosa"


async def _wait_ready(port: int, process: asyncio.subprocess.Process) -> None:
    async def ready() -> bool:
        if process.returncode is not None:
            raise AssertionError(f"the server exited with {process.returncode}")
        try:
            async with httpx.AsyncClient(timeout=1) as client:
                return (await client.get(f"http://127.0.0.1:{port}/v2/health/ready")).status_code == 200
        except httpx.TransportError:
            return False

    await eventually(ready, "the README's server to be ready", timeout_s=30)


async def test_the_capacity_example_serves_its_two_models(tmp_path: Path) -> None:
    # A module of the directory the user works in, as `asyncserve serve` imports it (its processes too).
    await asyncio.to_thread((tmp_path / "capacity.py").write_text, example("class Encoder(Model)"))
    async with (
        launch(
            "serve",
            "capacity:service",
            env={},
            log_dir=tmp_path,
            program=(str(VENV / "bin" / "asyncserve"),),
            cwd=tmp_path,
        ) as server,
        httpx.AsyncClient(base_url=str(server.url)) as client,
    ):
        encoded = await client.post("/v1/models/encoder/predict", json={"text": "hello"})
        ranked = await client.post("/v1/models/ranker/predict", json=[{"text": "a"}, {"text": "abc"}])
    assert encoded.json() == {"length": 5}
    assert ranked.json() == [{"length": 1}, {"length": 3}]
