"""The dashboard's HTTP side through a real server: the page and its files, and ``GET /ui/summary`` (its
shape, its numbers moving with the traffic, keys and scopes); the summary's arithmetic on its own."""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

import httpx
import pytest

from asyncserve import Service, Settings
from asyncserve.http.auth import new_key
from asyncserve.http.summary import merge, quantile
from asyncserve.metrics import LATENCY_BUCKETS_S
from asyncserve.model import Model
from asyncserve.tensors import Tensor
from tests.conftest import RunningServer, serving
from tests.models import Adder, Sleeper
from tests.processes import eventually
from tests.test_server import cli

ROW = {"a": [1.0, 2.0, 3.0], "b": [1.0, 1.0, 1.0]}
BOUNDS = (*LATENCY_BUCKETS_S, float("inf"))


class BrokenLoad(Model):
    """A model whose load fails, as a missing weights file would (async: sync models load together)."""

    name = "broken"
    inputs: ClassVar = {"x": Tensor("INT64")}
    outputs: ClassVar = {"y": Tensor("INT64")}

    def load(self) -> None:
        raise FileNotFoundError("weights.onnx is missing")

    async def predict(self, x: Any) -> Any:
        return x


class TinyQueue(Sleeper):
    """Holds one row in its queue and runs one batch at a time: a third concurrent request is shed."""

    name = "tiny"
    max_queue_size = 1
    max_concurrent_batches = 1
    max_batch_size = 1


SERVICE = Service(Adder(), TinyQueue(), BrokenLoad(), name="ui")
SETTINGS = Settings(executor_workers=2, loop_lag_interval_s=0.01, jobs="memory://")


async def summary(client: httpx.AsyncClient, **headers: str) -> dict[str, Any]:
    response = await client.get("/ui/summary", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    body: dict[str, Any] = response.json()
    return body


def model(body: dict[str, Any], label: str) -> dict[str, Any]:
    found: dict[str, Any] = next(m for m in body["models"] if m["label"] == label)
    return found


# --- the page and its files --------------------------------------------------------------------


async def test_the_page_is_html_from_the_package_and_names_only_its_own_files(running: RunningServer) -> None:
    async with running.client() as client:
        page = await client.get("/ui")
        assert page.status_code == 200
        assert page.headers["content-type"] == "text/html; charset=utf-8"
        assert page.headers["cache-control"] == "no-cache"
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert "http://" not in page.text, "nothing from elsewhere"
        assert "https://" not in page.text, "nothing from elsewhere"
        for name, kind in [("app.js", "text/javascript"), ("uPlot.iife.min.js", "text/javascript"),
                           ("app.css", "text/css"), ("uPlot.min.css", "text/css")]:  # fmt: skip
            assert f"/ui/assets/{name}?v=" in page.text, name
            asset = await client.get(f"/ui/assets/{name}")
            assert asset.status_code == 200, name
            assert asset.headers["content-type"].startswith(kind), name
            assert asset.headers["cache-control"] == "public, max-age=86400"
            again = await client.get(f"/ui/assets/{name}", headers={"If-None-Match": asset.headers["etag"]})
            assert (again.status_code, again.content) == (304, b"")


async def test_the_script_renders_server_data_as_text_only(running: RunningServer) -> None:
    async with running.client() as client:
        script = (await client.get("/ui/assets/app.js")).text
    assert "textContent" in script
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in script, sink


async def test_the_chart_library_ships_with_its_licence(running: RunningServer) -> None:
    async with running.client() as client:
        licence = await client.get("/ui/assets/uPlot.LICENSE")
    assert licence.headers["content-type"] == "text/plain; charset=utf-8"
    assert "The MIT License" in licence.text
    assert "Leon Sorokin" in licence.text


@pytest.mark.parametrize("name", ["index.html", "..%2Fui.py", "nope.js"])
async def test_a_file_that_is_not_the_pages_is_not_found(running: RunningServer, name: str) -> None:
    async with running.client() as client:
        response = await client.get(f"/ui/assets/{name}")
    assert response.status_code == 404
    assert response.json()["code"] == "not_found"
    assert "/ui" in response.json()["error"]


# --- the summary -------------------------------------------------------------------------------


async def test_the_summary_describes_every_model_the_server_and_the_jobs(running: RunningServer) -> None:
    async with running.client() as client:
        body = await summary(client)
    assert [m["label"] for m in body["models"]] == ["adder", "tiny", "broken"]
    adder = model(body, "adder")
    assert adder["state"] == "READY"
    assert adder["inputs"] == [{"name": "a", "datatype": "FP32", "shape": [-1, 3]},
                               {"name": "b", "datatype": "FP32", "shape": [-1, 3]}]  # fmt: skip
    assert {"requests_per_s", "p50_s", "p99_s", "mean_batch_rows", "queued_rows", "shed_per_s"} <= set(adder["stats"])
    broken = model(body, "broken")
    assert broken["state"] == "UNAVAILABLE"
    assert "weights.onnx is missing" in broken["reason"]
    assert set(body["server"]) == {"loop_lag_s", "in_flight", "executor_use"}
    assert body["server"]["in_flight"] >= 1  # this request
    assert [w["worker"] for w in body["workers"]] == [0]
    assert body["workers_missing"] == 0
    assert set(body["jobs"]["counts"]) == {"queued", "running", "succeeded", "failed", "cancelled", "expired"}


async def test_requests_move_the_models_numbers(running: RunningServer) -> None:
    async with running.client() as client:
        before = model(await summary(client), "adder")["stats"]
        answers = await asyncio.gather(*(client.post("/v1/models/adder/predict", json=ROW) for _ in range(20)))
        assert {a.status_code for a in answers} == {200}
        after = model(await summary(client), "adder")["stats"]
    assert after["requests_total"] == before["requests_total"] + 20
    assert after["requests_per_s"] > 0
    assert after["rows_per_s"] > 0
    assert 0 < after["p50_s"] <= after["p99_s"] < 5
    assert after["mean_batch_rows"] >= 1


async def test_a_shed_request_is_counted_by_its_reason(running: RunningServer) -> None:
    async with running.client() as client:
        answers = await asyncio.gather(
            *(client.post("/v1/models/tiny/predict", json={"seconds": 0.3}) for _ in range(4))
        )
        assert 503 in {a.status_code for a in answers}
        stats = model(await summary(client), "tiny")["stats"]
    assert sum(stats["shed_total"].values()) >= 1
    assert set(stats["shed_total"]) <= {"queue_full", "deadline_unreachable"}
    assert sum(stats["shed_per_s"].values()) > 0


async def test_a_queued_row_shows_in_the_queue_depth(running: RunningServer) -> None:
    async with running.client() as client:
        busy = asyncio.ensure_future(client.post("/v1/models/tiny/predict", json={"seconds": 0.5}))

        async def running_one() -> bool:  # sent together, the second request could run first
            metrics = (await client.get("/metrics")).text
            return 'asyncserve_batches_running{model="tiny"} 1.0' in metrics

        await eventually(running_one, "the slow request to run")
        waiting = asyncio.ensure_future(client.post("/v1/models/tiny/predict", json={"seconds": 0.0}))

        async def queued() -> bool:
            return bool(model(await summary(client), "tiny")["stats"]["queued_rows"] == 1)

        await eventually(queued, "a row waiting in tiny's queue")
        assert ((await busy).status_code, (await waiting).status_code) == (200, 200)


async def test_executor_use_rises_while_the_executor_works(running: RunningServer) -> None:
    async with running.client() as client:
        work = asyncio.ensure_future(client.post("/v1/models/tiny/predict", json={"seconds": 0.6}))
        await work

        async def used() -> bool:
            return bool((await summary(client))["server"]["executor_use"] > 0.01)

        await eventually(used, "the executor's use to show")


async def test_submitted_jobs_show_in_the_counts(running: RunningServer) -> None:
    async with running.client() as client:
        before = (await summary(client))["jobs"]["counts"]
        job = await client.post("/v1/jobs", json={"model": "adder", "inputs": ROW})
        assert job.status_code == 202

        async def counted() -> bool:
            counts = (await summary(client))["jobs"]["counts"]
            return bool(sum(counts.values()) == sum(before.values()) + 1 and counts["succeeded"] > before["succeeded"])

        await eventually(counted, "the job to be counted as succeeded")


# --- keys and scopes ---------------------------------------------------------------------------

KEYS = {scope: new_key(f"key-{scope}", [scope]) for scope in ("infer", "metrics")}


async def test_the_summary_needs_the_metrics_scope_and_the_page_stays_open() -> None:
    settings = Settings(
        executor_workers=1, loop_lag_interval_s=0.01, jobs="memory://",
        api_keys="\n".join(known.line() for _, known in KEYS.values()),
    )  # fmt: skip
    async with serving(Service(Adder(), name="keys"), settings) as server, server.client() as client:
        assert (await client.get("/ui")).status_code == 200
        assert (await client.get("/ui/assets/app.js")).status_code == 200
        anonymous = await client.get("/ui/summary")
        assert (anonymous.status_code, anonymous.json()["code"]) == (401, "unauthorized")
        wrong = await client.get("/ui/summary", headers={"Authorization": f"Bearer {KEYS['infer'][0]}"})
        assert (wrong.status_code, wrong.json()["code"]) == (403, "forbidden")
        body = await summary(client, Authorization=f"Bearer {KEYS['metrics'][0]}")
        assert [m["label"] for m in body["models"]] == ["adder"]


async def test_a_server_without_jobs_says_so() -> None:
    settings = Settings(executor_workers=1, loop_lag_interval_s=0.01, jobs="")
    async with serving(Service(Adder(), name="nojobs"), settings) as server, server.client() as client:
        assert (await summary(client))["jobs"] is None


# --- with --workers N ---------------------------------------------------------------------------


async def test_with_two_workers_the_summary_adds_up_both_and_lists_each() -> None:
    async with cli("serve", "tests.services:service", "--workers", "2") as (_, url):
        # cli returns once a worker is ready; the other may still load its models (and answer 503).
        await eventually(lambda: every_worker_ready(url), "both workers ready")
        for _ in range(20):
            # A fresh connection each time, so the kernel may hand it to either worker.
            async with httpx.AsyncClient(base_url=url) as client:
                assert (await client.post("/v1/models/adder/predict", json=ROW)).status_code == 200

        async with httpx.AsyncClient(base_url=url) as client:

            async def both_counted() -> bool:
                body = await summary(client)
                return [w["worker"] for w in body["workers"]] == [0, 1] and (
                    model(body, "adder")["stats"]["requests_total"] == 20 and body["workers_missing"] == 0
                )

            await eventually(both_counted, "both workers' reports, adding up to the 20 requests")


async def every_worker_ready(url: str, probes: int = 12) -> bool:
    """Whether ``probes`` fresh connections in a row find a ready worker: the kernel hands each to either
    worker, so a worker still loading is missed only with odds of 1 in 2**probes."""
    for _ in range(probes):
        async with httpx.AsyncClient(base_url=url) as client:
            if (await client.get("/v2/health/ready")).status_code != 200:
                return False
    return True


# --- the arithmetic ----------------------------------------------------------------------------


def test_a_quantile_is_interpolated_inside_its_bucket() -> None:
    counts = [0] * len(BOUNDS)
    counts[3] = 10  # ten requests between 5 and 10 ms
    assert quantile(0.5, counts, BOUNDS) == pytest.approx(0.0075)
    assert quantile(0.99, counts, BOUNDS) == pytest.approx(0.00995)
    assert quantile(0.5, [0] * len(BOUNDS), BOUNDS) is None
    counts = [0] * len(BOUNDS)
    counts[-1] = 3  # past the last bound: that bound, not infinity
    assert quantile(0.5, counts, BOUNDS) == BOUNDS[-2]


def _report(worker: int, latency_bucket: int, requests_per_s: float, in_flight: int, lag_s: float) -> dict[str, Any]:
    latency = [0] * len(BOUNDS)
    latency[latency_bucket] = 10
    stats = {
        "requests_per_s": requests_per_s, "rows_per_s": requests_per_s, "latency": latency, "batch_rows": 30.0,
        "batches": 10, "shed_per_s": {"queue_full": 1.0}, "requests_total": 100, "shed_total": {"queue_full": 5.0},
        "queued_rows": 2,
    }  # fmt: skip
    return {
        "worker": worker, "window_s": 3.0, "loop_lag_s": lag_s, "in_flight": in_flight, "executor_workers": 2,
        "busy_s_per_s": 1.0, "models": {"m": stats},
    }  # fmt: skip


def test_workers_reports_add_up_and_percentiles_come_from_the_added_buckets() -> None:
    merged = merge([_report(1, 8, 5.0, 1, 0.002), _report(0, 2, 10.0, 3, 0.001)], BOUNDS)
    m = merged["models"]["m"]
    assert m["requests_per_s"] == 15.0
    assert m["requests_total"] == 200
    assert m["shed_total"] == {"queue_full": 10.0}
    assert m["queued_rows"] == 4
    assert m["mean_batch_rows"] == 3.0
    assert BOUNDS[1] <= m["p50_s"] <= BOUNDS[2]  # half the requests were fast
    assert BOUNDS[7] <= m["p99_s"] <= BOUNDS[8]  # the slowest came from worker 1
    assert merged["server"] == {"loop_lag_s": 0.002, "in_flight": 4, "executor_use": 0.5}
    assert [(w["worker"], w["requests_per_s"]) for w in merged["workers"]] == [(0, 10.0), (1, 5.0)]
