"""The command line as a user runs it: the ``asyncserve`` script, in the user's directory, with what a plain
``pip install .`` brings (no extras)."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.processes import REPO, launch

pytestmark = pytest.mark.e2e

WITHOUT_HTTPX = """
import sys


class NotInstalled:
    # What a plain `pip install .` leaves out: httpx (and httpcore) come with the `client` extra only.
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("httpx", "httpcore"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


assert "httpx" not in sys.modules
sys.meta_path.insert(0, NotInstalled())
from asyncserve.cli import main

sys.exit(main())
"""
"""``python -c WITHOUT_HTTPX ARGS`` is ``asyncserve ARGS`` where httpx is not installed."""

SECRET = "0123456789abcdef" * 4


async def test_a_plain_install_serves_a_service_without_httpx(tmp_path: Path) -> None:
    program = (sys.executable, "-c", WITHOUT_HTTPX)
    server = launch("serve", "tests.services:service", env={}, log_dir=tmp_path, program=program)
    async with server as running, httpx.AsyncClient(base_url=running.url or "", timeout=10) as client:
        response = await client.post("/v1/models/adder/predict", json={"a": [1, 2, 3], "b": [4, 5, 6]})
    assert response.status_code == 200, response.text
    assert response.json()["total"] == 21.0


def test_webhooks_without_httpx_are_a_one_line_error_with_the_install_command() -> None:
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_HTTPX, "serve", "tests.services:service", "--port", "0"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
        env={**os.environ, "ASYNCSERVE_WEBHOOK_SECRET": SECRET},
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.splitlines() == ["asyncserve: error: webhooks need httpx: pip install 'asyncserve[client]'"]


async def test_serve_imports_the_service_from_the_current_directory(tmp_path: Path) -> None:
    # The README's service, saved as service.py, served with the README's command from its directory.
    script = await asyncio.to_thread(_save_the_readme_service, tmp_path / "service.py")
    env = {"PYTHONPATH": ""}  # nothing but the current directory can find service.py
    server = launch("serve", "service:service", env=env, log_dir=tmp_path, program=(script,), cwd=tmp_path)
    async with server as running, httpx.AsyncClient(base_url=running.url or "", timeout=10) as client:
        response = await client.post("/v1/models/scaler/predict", json={"x": [1, 2, 3]})
    assert response.json() == {"y": [1.0, 20.0, 300.0]}


def test_a_module_that_is_nowhere_says_where_it_was_looked_for(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "asyncserve", "serve", "nowhere_to_be_found:service", "--port", "0"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60, env=os.environ,
    )  # fmt: skip
    assert result.returncode == 2
    assert "cannot import module 'nowhere_to_be_found'" in result.stderr
    assert "run from the directory that holds it, or add that directory to PYTHONPATH" in result.stderr


def _save_the_readme_service(path: Path) -> str:
    """Write the README's service to ``path``; return the ``asyncserve`` script installed next to this Python."""
    readme = (REPO / "README.md").read_text()
    (code,) = [block for block in re.findall(r"```python\n(.*?)```", readme, flags=re.DOTALL) if "Scaler" in block]
    path.write_text(code)
    script = shutil.which("asyncserve", path=str(Path(sys.executable).parent))
    assert script is not None, "the asyncserve script is not installed next to this Python"
    return script
