"""The dashboard in a real browser (Debian's Chromium, headless, through Playwright) against the demo service,
with every request to another host refused: it shows every model, answers a try-it request, charts the
throughput of a load, follows a job to ``succeeded`` and cancels another. It leaves a screenshot under load.

The server runs in its own thread (``serving``); the browser is driven with Playwright's async API from
the test's loop, and the load comes from aiohttp on the same loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import urllib.parse
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from blockbuster import BlockBuster
from playwright.async_api import Page, Request, Route, async_playwright, expect

from asyncserve import Settings, demo
from tests.conftest import RunningServer, serving
from tests.processes import launch

CHROMIUM = "/usr/bin/chromium"
SCREENSHOT_COPY = "ASYNCSERVE_DASHBOARD_SCREENSHOT"
"""Set to a path (docs/dashboard.png) to keep a copy of the screenshot there too."""

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (apt-get install chromium)"),
]


@pytest.fixture(autouse=True)
def playwright_may_look_for_its_driver(blockbuster: BlockBuster) -> None:
    """Playwright checks that its driver's files exist (os.stat) once, as it starts the driver process."""
    for function in blockbuster.functions.values():
        function.can_block_in("playwright/_impl/_driver.py", "compute_driver_executable")


@contextlib.asynccontextmanager
async def offline_page(server: RunningServer) -> AsyncIterator[tuple[Page, list[str]]]:
    """A Chromium page that may reach ``server`` and nothing else; yields it and the URLs it was refused."""
    own = urllib.parse.urlsplit(server.url).netloc
    refused: list[str] = []

    async def only_the_server(route: Route, request: Request) -> None:
        if urllib.parse.urlsplit(request.url).netloc == own:
            await route.continue_()
        else:
            refused.append(request.url)
            await route.abort("internetdisconnected")

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM)
        try:
            page = await browser.new_page(viewport={"width": 1400, "height": 1000})
            await page.route("**/*", only_the_server)
            yield page, refused
        finally:
            await browser.close()


async def load(url: str, stop: asyncio.Event) -> int:
    """iris predictions from 8 connections until ``stop``; returns how many were answered 200."""
    answered = 0

    async def one_connection(session: aiohttp.ClientSession) -> None:
        nonlocal answered
        while not stop.is_set():
            async with session.post(f"{url}/v1/models/iris/predict", json={"features": [6.3, 3.3, 6.0, 2.5]}) as r:
                answered += r.status == 200
                await r.read()

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(one_connection(session) for _ in range(8)))
    return answered


async def chart_value(page: Page, model: str, metric: str) -> float:
    value = await page.get_attribute(f'article[data-model="{model}"] .chart[data-metric="{metric}"]', "data-last")
    return float(value or 0)


async def chart_points(page: Page) -> int:
    return int(
        await page.get_attribute('article[data-model="iris"] .chart[data-metric="throughput"]', "data-points") or 0
    )


async def test_the_dashboard_shows_the_demo_service_offline_and_drives_it(tmp_path: Path) -> None:
    jobs_db = tmp_path / "jobs.db"
    # No job worker in the server: jobs wait until the test starts a standalone worker, so one can be cancelled.
    settings = Settings(executor_workers=2, loop_lag_interval_s=0.01, jobs=f"sqlite://{jobs_db}", job_workers=0)
    async with serving(demo.service, settings) as server, offline_page(server) as (page, refused):
        await page.goto(f"{server.url}/ui")
        for spec in demo.service.specs:
            await expect(page.locator(f'article[data-model="{spec.label}"] .state')).to_have_text("READY")

        # Try it: iris's form comes filled with its example.
        iris = page.locator('form.try[data-model="iris"]')
        await iris.get_by_role("button", name="Predict").click()
        await expect(iris.locator('[data-role="answer"]')).to_contain_text('"label"')

        # Load: the throughput chart climbs (and keeps a few seconds of it, for the screenshot).
        stop = asyncio.Event()
        loading = asyncio.ensure_future(load(server.url, stop))
        try:
            async with asyncio.timeout(20):
                while await chart_value(page, "iris", "throughput") < 20 or await chart_points(page) < 6:
                    await page.wait_for_timeout(200)
            shot = tmp_path / "dashboard.png"
            await page.screenshot(path=str(shot), full_page=True)
        finally:
            stop.set()
            answered = await loading
        assert answered > 0
        assert (await asyncio.to_thread(shot.stat)).st_size > 10_000
        if os.environ.get(SCREENSHOT_COPY):
            await asyncio.to_thread(shutil.copyfile, shot, os.environ[SCREENSHOT_COPY])

        # Two jobs from iris's form; the second is cancelled while it waits.
        submit = iris.locator('[data-role="job"]')
        await submit.click()
        await expect(iris.locator('[data-role="answer"]')).to_contain_text("queued")
        first = (await iris.locator('[data-role="answer"]').text_content() or "").split()[1].rstrip(":")
        await submit.click()
        await expect(iris.locator('[data-role="answer"]')).not_to_contain_text(first)
        second = (await iris.locator('[data-role="answer"]').text_content() or "").split()[1].rstrip(":")
        await page.locator(f'tr[data-job="{second}"] [data-role="cancel"]').click()
        await expect(page.locator(f'tr[data-job="{second}"]')).to_have_attribute("data-status", "cancelled")

        # Follow the first job's events live while a standalone worker runs it.
        await page.locator(f'tr[data-job="{first}"]').click()
        await expect(page.locator("#events")).to_have_attribute("data-last", "queued")
        worker = ("worker", "asyncserve.demo:service", "--broker", f"sqlite://{jobs_db}")
        async with launch(*worker, env={}, log_dir=tmp_path, http=False):
            await expect(page.locator("#events")).to_have_attribute("data-last", "succeeded", timeout=30_000)
        await expect(page.locator(f'tr[data-job="{first}"]')).to_have_attribute("data-status", "succeeded")
        await expect(page.locator("#events")).to_contain_text("result")

    assert refused == [], "the page asked for nothing but its own server"
