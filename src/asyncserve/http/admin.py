"""The model repository extension: list the models, load and unload them (``/v2/repository/...``)."""

from __future__ import annotations

import orjson

from asyncserve.exceptions import InvalidRequest, ModelError, SchemaViolation
from asyncserve.http.routing import Request, Response, Router
from asyncserve.runtime.registry import ModelRegistry


class RepositoryRoutes:
    """Handlers of the repository extension, over the registry."""

    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry

    def add_routes(self, router: Router) -> None:
        router.add("POST", "/v2/repository/index", self.index, "repository_index", scope="admin")
        router.add("POST", "/v2/repository/models/{model}/load", self.load, "repository_load", scope="admin")
        router.add("POST", "/v2/repository/models/{model}/unload", self.unload, "repository_unload", scope="admin")

    def index(self, request: Request) -> Response:
        only_ready = _index_filter(request.body)
        rows = [e.index_row() for e in self.registry.entries if not only_ready or e.state.value == "READY"]
        return Response.json(rows)

    async def load(self, request: Request) -> Response:
        await self.registry.load(request.params["model"])
        entry = self.registry.find(request.params["model"])
        if entry.state.value != "READY":
            raise ModelError(f"model {entry.spec.label!r} failed to load: {entry.reason}")
        return Response.json({})

    def unload(self, request: Request) -> Response:
        self.registry.unload(request.params["model"])
        return Response.json({})


def _index_filter(body: bytes) -> bool:
    """The repository index request's optional ``{"ready": true}``: list only ready models."""
    if not body.strip():
        return False
    try:
        request = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"the repository index request is not valid JSON: {exc}") from None
    if not isinstance(request, dict) or not isinstance(request.get("ready", False), bool):
        raise SchemaViolation("ready", 'send {"ready": true} or {"ready": false}, or no body')
    return bool(request.get("ready", False))
