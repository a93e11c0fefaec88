"""``GET /v1/models``: the models of a server, every version, its readiness and the schemas of its rows.

The answer is what a client needs to call the JSON API without reading ``/openapi.json``::

    {"models": [{"name": "iris", "latest": "2", "versions": [
        {"version": "2", "state": "READY", "ready": true, "reason": null,
         "predict": "/v1/models/iris/versions/2/predict", "streams": false,
         "inputs": {...JSON Schema of one row...}, "outputs": {...}}, ...]}]}

Versions are listed highest first, as the registry orders them; ``latest`` is the one
``/v1/models/{name}/predict`` serves. The row schemas are those of the OpenAPI document.
"""

from __future__ import annotations

from typing import Any

from asyncserve.http.openapi import row_schema
from asyncserve.model import ModelSpec
from asyncserve.runtime.registry import ModelEntry, ModelRegistry, ModelState


class ModelCatalog:
    """Builds the ``GET /v1/models`` answer; each model's row schemas are made once and kept."""

    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry
        self._schemas: dict[tuple[str, str | None], tuple[dict[str, Any], dict[str, Any]]] = {}

    def models(self) -> dict[str, Any]:
        names = list(dict.fromkeys(entry.spec.name for entry in self.registry.entries))
        return {"models": [self._model(name) for name in names]}

    def _model(self, name: str) -> dict[str, Any]:
        versions = self.registry.versions(name)
        return {"name": name, "latest": versions[0].spec.version, "versions": [self._version(e) for e in versions]}

    def _version(self, entry: ModelEntry) -> dict[str, Any]:
        spec = entry.spec
        inputs, outputs = self._row_schemas(spec)
        return {
            "version": spec.version,
            "state": entry.state.value,
            "ready": entry.state is ModelState.READY,
            "reason": entry.reason or None,
            "predict": predict_path(spec),
            "streams": spec.streams,
            "inputs": inputs,
            "outputs": outputs,
        }

    def _row_schemas(self, spec: ModelSpec) -> tuple[dict[str, Any], dict[str, Any]]:
        schemas = self._schemas.get(spec.key)
        if schemas is None:
            schemas = self._schemas[spec.key] = (row_schema(spec.inputs), row_schema(spec.outputs, outputs=True))
        return schemas


def predict_path(spec: ModelSpec) -> str:
    """Where the JSON API serves ``spec``: its version's own path, or its name's for a model without versions."""
    if spec.version is None:
        return f"/v1/models/{spec.name}/predict"
    return f"/v1/models/{spec.name}/versions/{spec.version}/predict"
