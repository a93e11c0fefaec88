"""The server as users run it: the CLI in a subprocess, signals, several workers, the process executor."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

import asyncserve
from tests.processes import free_port

pytestmark = pytest.mark.e2e


@asynccontextmanager
async def cli(*args: str, env: dict[str, str] | None = None) -> AsyncIterator[tuple[subprocess.Popen[bytes], str]]:
    """``python -m asyncserve ARGS`` for async tests: starting and stopping run off the test's event loop."""
    manager = started_cli(*args, env=env)
    running = await asyncio.to_thread(manager.__enter__)
    try:
        yield running
    finally:
        await asyncio.to_thread(manager.__exit__, None, None, None)


@contextmanager
def started_cli(*args: str, env: dict[str, str] | None = None) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """Run ``python -m asyncserve ARGS`` and wait until it is ready; kill it if the test leaves it running."""
    port = free_port()
    command = [sys.executable, "-m", "asyncserve", *args, "--port", str(port)]
    process = subprocess.Popen(
        command, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(process, url)
        yield process, url
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(10)
        if process.stdout is not None:
            process.stdout.close()


def wait_until_ready(process: subprocess.Popen[bytes], url: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            output = process.stdout.read().decode() if process.stdout else ""
            raise AssertionError(f"the server exited with {process.returncode}:\n{output}")
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not become ready")


async def test_sigterm_finishes_in_flight_requests_then_exits_0() -> None:
    async with cli("serve", "tests.services:service", "--executor-workers", "2") as (process, url):
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            in_flight = asyncio.create_task(client.post("/v1/models/sleeper/predict", json={"seconds": 1.0}))
            await asyncio.sleep(0.3)
            process.send_signal(signal.SIGTERM)
            response = await in_flight
        assert response.status_code == 200
        assert await asyncio.to_thread(process.wait, 15) == 0
        async with httpx.AsyncClient() as fresh:
            with pytest.raises(httpx.ConnectError):
                await fresh.get(f"{url}/v2/health/live")


async def test_several_workers_share_the_port() -> None:
    async with cli("serve", "tests.services:service", "--workers", "2") as (process, url):
        pids: set[int] = set()
        for _ in range(200):
            # A fresh connection each time, so the kernel may hand it to either worker.
            async with httpx.AsyncClient(base_url=url) as client:
                response = await client.post("/v1/models/sleeper/predict", json={"seconds": 0})
            if response.status_code == 503:  # readiness said one worker was ready; the other may still load
                assert response.json()["code"] == "model_not_ready", response.text
                await asyncio.sleep(0.05)
                continue
            pids.add(response.json()["pid"])
            if len(pids) == 2:
                break
        assert len(pids) == 2
        assert process.pid not in pids
        process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.wait, 20) == 0


async def test_process_executor_loads_models_in_workers_and_keeps_the_loop_free() -> None:
    env = {"ASYNCSERVE_EXECUTOR": "process", "ASYNCSERVE_EXECUTOR_WORKERS": "2"}
    async with cli("serve", "tests.services:service", env=env) as (process, url):
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            response = await client.post("/v1/models/sleeper/predict", json={"seconds": 0})
        assert response.status_code == 200
        assert response.json()["pid"] != process.pid
        # Spinner holds the GIL in pure Python: only worker processes keep it off the event loop.
        latencies, served = await probe_while_loaded(url, "spinner", b'{"seconds": 0.3}')
    assert served >= 4
    assert percentile(latencies, 99) < 0.05, latencies


async def probe_while_loaded(url: str, model: str, body: bytes) -> tuple[list[float], int]:
    """Liveness latencies measured by one process while another keeps ``model`` busy."""
    load = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.probe", "load", url, "2.0", "8", model, body.decode(), stdout=subprocess.PIPE
    )
    await asyncio.sleep(0.3)
    probe = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.probe", "live", url, "1.5", stdout=subprocess.PIPE
    )
    latencies: list[float] = json.loads((await probe.communicate())[0])
    served: int = json.loads((await load.communicate())[0])
    return latencies, served


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q / 100))]


def test_bad_target_is_a_clear_error() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "asyncserve", "serve", "tests.services:nothing", "--port", "0"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 2
    assert "has no attribute 'nothing'" in result.stderr


def test_bad_environment_setting_is_a_clear_error() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "asyncserve", "serve", "tests.services:service"],
        capture_output=True, text=True, timeout=30, env={**os.environ, "ASYNCSERVE_PORT": "eighty"},
    )  # fmt: skip
    assert result.returncode == 2
    assert "ASYNCSERVE_PORT='eighty'" in result.stderr


async def test_demo_serves_real_models() -> None:
    async with cli("demo") as (process, url):
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            iris = await client.post("/v1/models/iris/predict", json={"features": [5.1, 3.5, 1.4, 0.2]})
            v2_body = {
                "inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [6.3, 3.3, 6.0, 2.5]}]
            }
            v2 = await client.post("/v2/models/iris/infer", json=v2_body)
            faq = await client.post("/v1/models/faq/predict", json={"question": "how can a request time out?"})
            embedding = await client.post("/v1/models/minilm/predict", json={"text": "hello"})
            churn = await client.post("/v1/models/churn/predict", json={"customer_id": 17})
            matches = await client.post(
                "/v1/models/faq-matches/predict", json={"question": "how can a request time out?"},
                headers={"Accept": "text/event-stream"},
            )  # fmt: skip
        assert iris.json()["label"] == "setosa"
        events = matches.text.strip().split("\n\n")
        assert len(events) == 4  # three matches, then the end
        assert events[-1].startswith("event: end")
        assert "X-Request-Timeout" in json.loads(events[0].removeprefix("data: "))["answer"]
        labels = {o["name"]: o for o in v2.json()["outputs"]}["label"]
        assert labels["data"] == ["virginica"]
        assert "X-Request-Timeout" in faq.json()["answer"]
        assert len(embedding.json()["embedding"]) == 384
        assert 0 <= churn.json()["churn_probability"] <= 1
        assert churn.json()["risk"] in ("low", "medium", "high")
        process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.wait, 15) == 0


async def test_sigterm_flushes_every_accepted_prediction_record(tmp_path: Path) -> None:
    log = tmp_path / "predictions.jsonl"
    env = {"ASYNCSERVE_PREDICTION_LOG": f"jsonl://{log}", "ASYNCSERVE_PREDICTION_LOG_SPILL": str(tmp_path / "spill")}
    async with cli("serve", "tests.services:service", env=env) as (process, url):
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            body = {"a": [1, 2, 3], "b": [1, 1, 1]}
            calls = [
                client.post("/v1/models/adder/predict", json=body, headers={"X-Request-ID": f"r{i}"})
                for i in range(100)
            ]
            responses = await asyncio.gather(*calls)
        assert all(response.status_code == 200 for response in responses)
        process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.wait, 15) == 0
    lines = (await asyncio.to_thread(log.read_text)).splitlines()
    records = [json.loads(line) for line in lines]
    assert sorted(record["request_id"] for record in records) == sorted(f"r{i}" for i in range(100))
    assert records[0]["outputs"]["sum"] == [[2.0, 3.0, 4.0]]


async def test_liveness_stays_fast_while_a_cpu_bound_model_is_saturated() -> None:
    # One executor thread, leaving the other core to the event loop; load and probe in processes of their own.
    async with cli("serve", "tests.services:service", "--executor-workers", "1") as (_process, url):
        latencies, served = await probe_while_loaded(url, "busy", b'{"n": 2}')
        async with httpx.AsyncClient(base_url=url) as client:
            metrics = (await client.get("/metrics")).text
    busy_seconds = sum(
        float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith('asyncserve_inference_duration_seconds_sum{model="busy"}')
    )
    assert served > 8
    assert busy_seconds > 1.5, f"the model was busy only {busy_seconds:.2f}s"
    assert percentile(latencies, 99) < 0.05, (
        f"p99 {percentile(latencies, 99) * 1000:.1f} ms over {len(latencies)} probes"
    )


async def test_with_several_workers_metrics_hold_every_worker_and_survive_a_dead_one() -> None:
    async with cli("serve", "tests.services:service", "--workers", "2") as (process, url):
        answered: dict[int, int] = {}  # pid -> 200s
        for _ in range(500):
            if len(answered) == 2 and min(answered.values()) >= 3:
                break
            async with httpx.AsyncClient(base_url=url) as client:  # a fresh connection: either worker may take it
                response = await client.post("/v1/models/sleeper/predict", json={"seconds": 0})
            if response.status_code == 503:  # that worker is still loading its models
                assert response.json()["code"] == "model_not_ready", response.text
                await asyncio.sleep(0.05)
                continue
            assert response.status_code == 200, response.text
            pid = response.json()["pid"]
            answered[pid] = answered.get(pid, 0) + 1
        assert len(answered) == 2, "the kernel gave every connection to one worker"
        for _ in range(4):  # whichever worker takes the scrape, it holds both
            async with httpx.AsyncClient(base_url=url) as client:
                text = (await client.get("/metrics")).text
            served = samples(text, "asyncserve_requests_total", route="v1_predict", model="sleeper", status="200")
            assert set(served) == {"0", "1"}
            assert sum(served.values()) == sum(answered.values())
            assert samples(text, "asyncserve_metrics_workers_missing") == {"": 0.0}
        os.kill(next(iter(answered)), signal.SIGKILL)
        async with httpx.AsyncClient(base_url=url) as client:
            started = time.monotonic()
            text = (await client.get("/metrics")).text
        assert time.monotonic() - started < 2.0
        assert samples(text, "asyncserve_metrics_workers_missing") == {"": 1.0}
        for _ in range(200):  # the supervisor starts a worker in its place, on the same socket path
            async with httpx.AsyncClient(base_url=url) as client:
                text = (await client.get("/metrics")).text
            if samples(text, "asyncserve_metrics_workers_missing") == {"": 0.0}:
                break
            await asyncio.sleep(0.1)
        assert set(samples(text, "asyncserve_build_info")) == {"0", "1"}
        process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.wait, 20) == 0


def samples(text: str, name: str, **labels: str) -> dict[str, float]:
    """The values of ``name``'s samples whose labels include ``labels``, by their worker label."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                found[sample.labels.get("worker", "")] = sample.value
    return found


def test_version_is_printed() -> None:
    command = [sys.executable, "-m", "asyncserve", "--version"]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == f"asyncserve {asyncserve.__version__}"


def descendants(pid: int) -> set[int]:
    """Every process below ``pid``, from /proc (Linux)."""
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in map(int, children):
            found |= {child} | descendants(child)
    return found


def running_pids(pids: set[int]) -> set[int]:
    """Those of ``pids`` still running (a zombie has ended; it only waits to be reaped)."""
    alive = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z":
            alive.add(pid)
    return alive


def ended_within(pids: set[int], seconds: float) -> set[int]:
    """Wait up to ``seconds`` for ``pids`` to end; return those still running."""
    until = time.monotonic() + seconds
    while running_pids(pids) and time.monotonic() < until:
        time.sleep(0.05)
    return running_pids(pids)


@pytest.mark.parametrize(
    ("args", "env"),
    [
        (("--executor", "process", "--executor-workers", "2"), {}),
        (("--workers", "2"), {}),
    ],
    ids=["process-pool", "two-workers"],
)
def test_a_server_killed_with_sigkill_leaves_no_process_and_frees_its_port(
    args: tuple[str, ...], env: dict[str, str], tmp_path: Path
) -> None:
    # Its own temporary directory: what the server leaves there (--workers' group directory) is seen.
    with started_cli("serve", "tests.services:service", *args, env={**env, "TMPDIR": str(tmp_path)}) as (
        process,
        url,
    ):
        children = descendants(process.pid)
        assert children, "the server should have child processes"
        process.kill()
        process.wait(10)
        assert not ended_within(children, 2.0), "processes outlived their killed parent by more than 2 s"
    assert list(tmp_path.glob("asyncserve-workers-*")) == [], "the killed server's workers left their directory"
    port = int(url.rsplit(":", 1)[1])
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", port))  # free again
