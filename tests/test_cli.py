"""The command line as a user runs it: the ``asyncserve`` script, in the user's directory, with what a plain
``pip install .`` brings (no extras)."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.processes import REPO, Running, eventually, launch

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


# One-line start-up failures (issue 18, item 6)

BROKEN_MODULE = "import numpy\n\nnumpy.load('/no/such/weights.npy')\n"


def _start_fails(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> str:
    """Run ``asyncserve serve ARGS`` from ``tmp_path`` (the repository on PYTHONPATH); its one error line."""
    result = subprocess.run(
        [sys.executable, "-m", "asyncserve", "serve", *args],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("asyncserve: error: ")]
    assert len(errors) == 1, result.stderr
    assert result.stderr.rstrip("\n").endswith(errors[0]), result.stderr  # the last thing printed
    return errors[0].removeprefix("asyncserve: error: ")


NO_DATABASE = "postgresql://postgres@127.0.0.1:5432/asyncserve_no_such_db"


@pytest.mark.parametrize(
    ("setting", "url", "component", "fix"),
    [
        (
            "ASYNCSERVE_JOBS",
            "redis://:hunter2@127.0.0.1:1/0",
            "job broker redis://:***@127.0.0.1:1/0",
            "ASYNCSERVE_JOBS",
        ),
        ("ASYNCSERVE_PREDICTION_CACHE", "redis://127.0.0.1:1/0", "prediction cache redis://127.0.0.1:1/0", "memory"),
        ("ASYNCSERVE_PREDICTION_LOG", NO_DATABASE, "prediction log postgres:predictions", "create it (createdb)"),
    ],
)
def test_a_store_that_cannot_be_used_is_one_line_naming_it_with_the_fix(
    tmp_path: Path, setting: str, url: str, component: str, fix: str
) -> None:
    line = _start_fails(tmp_path, "tests.services:service", "--port", "0", env={setting: url})
    assert line.startswith(f"{component}: "), line
    assert "hunter2" not in line
    cause, _, advice = line.removeprefix(f"{component}: ").partition("; ")
    assert cause, line
    assert fix in advice, line


def test_a_port_in_use_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = _start_fails(tmp_path, "tests.services:service", "--port", str(port))
    cause = f"cannot listen on 127.0.0.1:{port}: Address already in use"
    assert line == f"HTTP server: {cause}; pick another --port, or stop what uses it"


def test_a_tls_file_that_is_not_there_is_one_line(tmp_path: Path) -> None:
    line = _start_fails(
        tmp_path, "tests.services:service", "--port", "0", "--ssl-certfile", "nope.pem", "--ssl-keyfile", "nope.key"
    )
    assert line.startswith("TLS: cannot load the certificate 'nope.pem' with key 'nope.key'")
    assert line.endswith("; give PEM files (--ssl-certfile, --ssl-keyfile)")


def test_a_service_module_that_fails_to_import_is_one_line_and_the_traceback_only_in_debug(tmp_path: Path) -> None:
    (tmp_path / "broken.py").write_text(BROKEN_MODULE)
    line = _start_fails(tmp_path, "broken:service", "--port", "0")
    assert line.startswith("service broken:service: importing broken raised FileNotFoundError: ")
    assert "/no/such/weights.npy" in line
    result = subprocess.run(
        [sys.executable, "-m", "asyncserve", "serve", "broken:service", "--port", "0", "--log-level", "debug"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60, env=os.environ,
    )  # fmt: skip
    assert result.returncode == 2
    assert "Traceback (most recent call last)" in result.stderr
    assert 'broken.py", line 3' in result.stderr
    assert result.stderr.splitlines()[-1] == f"asyncserve: error: {line}"


def test_workers_that_cannot_start_stop_the_supervisor_with_one_line(tmp_path: Path) -> None:
    line = _start_fails(
        tmp_path,
        "tests.services:service",
        "--port",
        "0",
        "--workers",
        "2",
        env={"ASYNCSERVE_JOBS": "redis://127.0.0.1:1/0"},
    )
    assert line.startswith("job broker redis://127.0.0.1:1/0: "), line


# What `serve` says at start-up (issue 18, item 7)


async def test_the_log_counts_every_model_loaded_sync_and_async(tmp_path: Path) -> None:
    async with launch("serve", "tests.services:mixed", env={}, log_dir=tmp_path) as running:
        await eventually(lambda: _logged(running, "loaded "), "the load line")
        log = await running.log_text()
    assert re.search(
        r"loaded 4 of 4 model\(s\) in [0-9.]+s "
        r"\(3 with ThreadExecutor\(workers=\d+\), 0 with workers of their own, 1 async\): ",
        log,
    ), log


async def test_workers_log_how_many_their_pids_and_the_url(tmp_path: Path) -> None:
    async with launch("serve", "tests.services:service", "--workers", "2", env={}, log_dir=tmp_path) as running:
        await eventually(lambda: _logged(running, "loaded ", times=2), "both workers' load lines")
        log = await running.log_text()
    url = re.escape(running.url or "")
    supervisor = re.search(
        rf"supervisor {running.pid}: 2 workers \(pids (\d+), (\d+)\) serving tests.services:service on {url}\n", log
    )
    assert supervisor is not None, log
    serving = re.findall(rf"serving e2e on {url} \(pid (\d+)\)", log)
    assert sorted(serving) == sorted(supervisor.groups()), log


async def _logged(running: Running, text: str, times: int = 1) -> bool:
    return (await running.log_text()).count(text) >= times
