"""The dashboard at ``GET /ui``: a page and its files, served from the package, and the summary it polls.

The page (``http/static/``: HTML, a small script, uPlot for the charts, MIT, its licence beside it)
needs nothing but this server, so it works offline. Like ``/docs`` the page and its files are open; the
numbers are not: ``GET /ui/summary`` needs a key with the ``metrics`` scope once the server has keys
(the page asks for one and keeps it in the tab's ``sessionStorage``), and the jobs it shows come from
the jobs API under the ``jobs`` scope.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

import asyncserve
from asyncserve.exceptions import NotFound
from asyncserve.http import v2
from asyncserve.http.routing import Request, Response, Router
from asyncserve.http.summary import WorkerWindow, merge
from asyncserve.jobs import Broker
from asyncserve.metrics import LoopLagProbe, Metrics
from asyncserve.runtime.peers import MetricsPeers
from asyncserve.runtime.registry import ModelEntry, ModelRegistry

STATIC = Path(__file__).parent / "static"

ASSETS = {
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
    "uPlot.iife.min.js": "text/javascript; charset=utf-8",
    "uPlot.min.css": "text/css; charset=utf-8",
    "uPlot.LICENSE": "text/plain; charset=utf-8",
}
"""The page's files, and their types: nothing else under ``static/`` is served."""

PAGE_HEADERS = {
    "cache-control": "no-cache",
    # The page runs only its own files: no inline script, nothing from elsewhere.
    "content-security-policy": (
        "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
        "connect-src 'self'; frame-ancestors 'none'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}


@dataclass(frozen=True)
class Asset:
    body: bytes
    content_type: str
    etag: str


class Dashboard:
    """Route handlers for ``/ui``, its files and ``/ui/summary``.

    Example::

        dashboard = Dashboard(service_name, registry, metrics, loop_lag, executor_workers=4, broker=None)
        dashboard.add_routes(router)
    """

    def __init__(
        self,
        service_name: str,
        registry: ModelRegistry,
        metrics: Metrics,
        loop_lag: LoopLagProbe,
        *,
        executor_workers: int,
        broker: Broker | None,
        peers: MetricsPeers | None = None,
    ) -> None:
        self.service_name = service_name
        self.registry, self.metrics, self.broker, self.peers = registry, metrics, broker, peers
        index = 0 if peers is None else peers.group.index
        self.window = WorkerWindow(registry, metrics, loop_lag, executor_workers=executor_workers, index=index)
        if peers is not None:
            peers.answer_summaries(lambda: orjson.dumps(self.window.report()))
        self._assets: dict[str, Asset] | None = None
        self._page: bytes | None = None
        self._declarations: dict[tuple[str, str | None], dict[str, Any]] = {}

    def add_routes(self, router: Router) -> None:
        router.add("GET", "/ui", self.page, "ui", scope=None)
        router.add("GET", "/ui/summary", self.summary, "ui_summary", scope="metrics")
        router.add("GET", "/ui/assets/{name}", self.asset, "ui_asset", scope=None)

    # The page and its files

    async def page(self, request: Request) -> Response:
        if self._page is None:
            self._page = await asyncio.to_thread(self._render_page, await self._load_assets())
        return Response(200, self._page, dict(PAGE_HEADERS), content_type="text/html; charset=utf-8")

    async def asset(self, request: Request) -> Response:
        name = request.params["name"]
        asset = (await self._load_assets()).get(name)
        if asset is None:
            raise NotFound(f"no dashboard file {name!r}; the page is at /ui")
        headers = {"etag": asset.etag, "cache-control": "public, max-age=86400", "x-content-type-options": "nosniff"}
        if request.headers.get("if-none-match") == asset.etag:
            return Response(304, b"", headers, content_type=asset.content_type)
        return Response(200, asset.body, headers, content_type=asset.content_type)

    async def _load_assets(self) -> dict[str, Asset]:
        if self._assets is None:
            self._assets = await asyncio.to_thread(_read_assets)
        return self._assets

    def _render_page(self, assets: dict[str, Asset]) -> bytes:
        html = (STATIC / "index.html").read_text()
        # Each file's URL carries its digest: a new release is fetched anew, an unchanged one is cached.
        for name, asset in assets.items():
            html = html.replace("{" + name + "}", f"/ui/assets/{name}?v={asset.etag.strip(chr(34))}")
        return html.encode()

    # The numbers

    async def summary(self, request: Request) -> Response:
        """Models (declaration, state, recent rates), the server (and each worker), and job counts."""
        reports = await self._reports()
        merged = merge(reports, self.metrics.request_duration.bounds)
        stats = merged.pop("models")
        models = [
            {**self._declaration(entry), **_state(entry), "stats": stats[entry.spec.label]}
            for entry in self.registry.entries
        ]
        body = {
            "service": self.service_name,
            "version": asyncserve.__version__,
            "time": time.time(),
            **merged,
            "workers_missing": 0 if self.peers is None else self.peers.group.size - len(reports),
            "models": models,
            "jobs": None if self.broker is None else {"counts": await self.broker.stats()},
        }
        return Response(200, orjson.dumps(body, default=_text), {"cache-control": "no-store"})

    async def _reports(self) -> list[dict[str, Any]]:
        """Every worker's report that came in time (a worker being restarted may not answer, or not yet)."""
        if self.peers is None:
            return [self.window.report()]
        reports = []
        for text in (await self.peers.summaries()).values():
            with contextlib.suppress(orjson.JSONDecodeError):
                report = orjson.loads(text)
                if isinstance(report, dict) and "models" in report:
                    reports.append(report)
        return reports

    def _declaration(self, entry: ModelEntry) -> dict[str, Any]:
        """What a model takes and gives, and its example (for the page's try-it form); made once per model."""
        spec = entry.spec
        declared = self._declarations.get(spec.key)
        if declared is None:
            metadata = v2.model_metadata(spec)
            declared = self._declarations[spec.key] = {
                "label": spec.label,
                "name": spec.name,
                "version": spec.version,
                "streams": spec.streams,
                "inputs": metadata["inputs"],
                "outputs": metadata["outputs"],
                "example": spec.example,
            }
        return declared


def _state(entry: ModelEntry) -> dict[str, Any]:
    return {"state": entry.state.value, "reason": entry.reason}


def _read_assets() -> dict[str, Asset]:
    assets = {}
    for name, content_type in ASSETS.items():
        body = (STATIC / name).read_bytes()
        assets[name] = Asset(body, content_type, f'"{hashlib.sha256(body).hexdigest()[:16]}"')
    return assets


def _text(value: Any) -> Any:
    """What orjson cannot write (bytes in a model's example, say) as text."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON")
