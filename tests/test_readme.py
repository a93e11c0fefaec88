"""The README's service runs, and answers what the README says it answers, through a real server."""

from __future__ import annotations

import re
import subprocess
import types
from pathlib import Path

import orjson

from asyncserve import Service
from tests.conftest import serving

REPO = Path(__file__).parent.parent
README = (REPO / "README.md").read_text()


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, flags=re.DOTALL)


def test_readme_names_the_two_setup_commands() -> None:
    assert "make demo" in README
    assert "make test" in README


async def test_the_readme_service_answers_the_readme_curl() -> None:
    code = next(block for block in python_blocks() if "class Scaler" in block)
    module = types.ModuleType("readme_service")
    exec(compile(code, "README.md", "exec"), module.__dict__)
    service = module.__dict__["service"]
    assert isinstance(service, Service)
    request, answer = _curl_and_answer("scaler")
    async with serving(service) as running, running.client() as client:
        response = await client.post("/v1/models/scaler/predict", content=request)
    assert response.json() == orjson.loads(answer)


def _curl_and_answer(model: str) -> tuple[bytes, str]:
    match = re.search(rf"/v1/models/{model}/predict .*?-d '(.*?)'\n# (.*?)\n", README)
    assert match, f"the README has no curl for {model}"
    return match.group(1).encode(), match.group(2)


def test_the_readme_ways_to_serve_from_python_name_what_exists() -> None:
    import asyncserve
    import asyncserve.asgi

    (code,) = [block for block in python_blocks() if "asyncserve.serve(" in block]
    compile(code, "README.md", "exec")  # it serves forever: checked for what it names, not run
    assert callable(asyncserve.serve)
    assert callable(asyncserve.asgi.app)
    assert "from asyncserve.asgi import app" in code


def test_the_readme_says_how_to_pick_the_demo_port_and_make_uses_it() -> None:
    match = re.search(r"`make demo PORT=(\d+)`", README)
    assert match, "the README does not say how to run the demo on another port"
    port = match.group(1)
    # -n prints the commands without running them (nor the set-up they may need first).
    planned = subprocess.run(
        ["make", "-n", "demo", f"PORT={port}"], cwd=REPO, capture_output=True, text=True, timeout=30, check=True
    )
    assert f".venv/bin/asyncserve demo --port {port}\n" in planned.stdout


async def test_the_readme_streaming_service_streams_as_the_readme_says() -> None:
    code = next(block for block in python_blocks() if "class Countdown" in block)
    module = types.ModuleType("readme_streaming")
    exec(compile(code, "README.md", "exec"), module.__dict__)
    match = re.search(r"/v1/models/countdown/predict .*?-d '(.*?)'\n", README)
    assert match, "the README has no curl for countdown"
    async with serving(module.__dict__["service"]) as running, running.client() as client:
        headers = {"Accept": "text/event-stream", "Content-Type": "application/json"}
        answer = await client.post("/v1/models/countdown/predict", content=match.group(1).encode(), headers=headers)
    events = answer.text.strip().split("\n\n")
    assert events[:4] == [f'data: {{"left":{n}}}' for n in (3, 2, 1, 0)]
    assert events[4].startswith("event: end")
