"""``GET /docs``: Swagger UI from the package, rendered by a real browser with no other host reachable."""

from __future__ import annotations

from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import pytest
from blockbuster import BlockBuster
from playwright.async_api import Route, async_playwright

from asyncserve.demo import service as demo
from asyncserve.http.docs import ASSET_TYPES, SWAGGER_UI_VERSION, docs_html
from tests.conftest import RunningServer, serving

CHROMIUM = "/usr/bin/chromium"
"""Debian's chromium (.ci/run installs it): Playwright never downloads a browser here."""


@pytest.fixture
def playwright_starts(blockbuster: BlockBuster) -> None:
    """Playwright looks for its driver with a blocking stat, once per start: tolerated there, nowhere else."""
    for function in blockbuster.functions.values():
        function.can_block_in("playwright/_impl/_driver.py", "compute_driver_executable")


@pytest.fixture(scope="module")
async def demo_server() -> AsyncIterator[RunningServer]:
    async with serving(demo) as running:
        yield running


def test_the_page_loads_swagger_ui_from_this_server() -> None:
    page = docs_html("/openapi.json", "demo - asyncserve")
    assert page.startswith("<!DOCTYPE html>")
    assert f'<script src="/docs/swagger-ui-bundle.js?v={SWAGGER_UI_VERSION}"></script>' in page
    assert f'<link rel="stylesheet" href="/docs/swagger-ui.css?v={SWAGGER_UI_VERSION}">' in page
    assert "http" not in page.replace('"/openapi.json"', "")  # no URL of another host
    assert 'url: "/openapi.json"' in page
    assert "<title>demo - asyncserve</title>" in page


def test_the_page_escapes_the_title_and_url() -> None:
    page = docs_html('/x"</script><script>alert(1)//', "<b>demo</b>")
    assert "<title>&lt;b&gt;demo&lt;/b&gt;</title>" in page
    assert page.count("</script>") == 2
    assert 'url: "/x\\"\\u003c/script>\\u003cscript>alert(1)//"' in page


@pytest.mark.parametrize("name", sorted(ASSET_TYPES))
async def test_the_assets_are_served_with_their_type_and_cached(demo_server: RunningServer, name: str) -> None:
    async with demo_server.client() as client:
        answer = await client.get(f"/docs/{name}", params={"v": SWAGGER_UI_VERSION})
    assert answer.status_code == 200
    assert answer.headers["content-type"] == ASSET_TYPES[name]
    assert answer.headers["cache-control"] == "public, max-age=86400"
    assert len(answer.content) > 100_000  # the real bundle and stylesheet, not a stub
    assert ("SwaggerUIBundle" if name.endswith(".js") else ".swagger-ui") in answer.text


@pytest.mark.usefixtures("playwright_starts")
async def test_docs_render_every_demo_model_with_no_other_host_reachable(demo_server: RunningServer) -> None:
    own = urlsplit(demo_server.url).netloc
    elsewhere: list[str] = []

    async def this_server_only(route: Route) -> None:
        if urlsplit(route.request.url).netloc == own:
            await route.continue_()
        else:  # as on an air-gapped server: nothing else answers
            elsewhere.append(route.request.url)
            await route.abort()

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM)
        try:
            page = await browser.new_page()
            await page.route("**/*", this_server_only)
            await page.goto(f"{demo_server.url}/docs")
            for spec in demo.specs:
                path = f"/v1/models/{spec.name}/predict"
                operation = page.locator(f'.opblock-post .opblock-summary-path[data-path="{path}"]')
                await operation.wait_for(timeout=15_000)
            await page.locator('.opblock-summary-path[data-path="/v2/models/{model_name}/infer"]').first.wait_for()
            title = await page.locator(".info .title").inner_text()
        finally:
            await browser.close()
    assert title.startswith("demo")
    assert elsewhere == []
