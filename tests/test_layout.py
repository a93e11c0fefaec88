"""The public API is short, sorted and complete, and the modules keep to the import rules."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import asyncserve

PACKAGE = Path(asyncserve.__file__).parent

LAYERS = {
    "exceptions": 0, "tensors": 0, "config": 0, "metrics": 0, "_utils": 0, "cache": 0, "calls": 0, "logs": 0,
    "tracing": 0,
    "features": 1, "predlog": 1, "jobs": 1,
    "model": 2,
    "composition": 3,
    "runtime": 4,
    "service": 5,
    "http": 6, "grpc": 6,
    "app": 7, "server": 8, "asgi": 8, "cli": 8, "demo": 8, "__main__": 8, "client": 8,
}  # fmt: skip
"""What each module or folder may import: its own layer or below (docs/architecture.md draws them).

0 leaves; 1 the backend families (feature sources, prediction-log sinks, job brokers); 2 the Model API;
3 composition (ensembles, coalescing, caches, deferred predictions); 4 the runtime (registry, batching,
executor, pipeline); 5 the Service; 6 the HTTP and gRPC edges; 7 the composition root (App); 8 the entry points
(server, ASGI, CLI, demo, client).
A folder counts as one unit: its modules may import each other."""


def unit_of(path: Path) -> str:
    """The layer unit of a module file: its folder under the package, or its own name at the top."""
    relative = path.relative_to(PACKAGE)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def test_every_module_has_a_layer() -> None:
    units = {unit_of(path) for path in PACKAGE.rglob("*.py")} - {"__init__"}
    assert units == set(LAYERS)


def imported_units(path: Path) -> set[str]:
    imported: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("asyncserve"):
            parts = node.module.split(".")
            if len(parts) > 1:
                imported.add(parts[1])
            else:
                imported.update(alias.name for alias in node.names if alias.name in LAYERS)
        elif isinstance(node, ast.Import):
            imported.update(a.name.split(".")[1] for a in node.names if a.name.startswith("asyncserve."))
    return imported


def test_import_rules() -> None:
    broken = []
    for path in sorted(PACKAGE.rglob("*.py")):
        unit = unit_of(path)
        if unit == "__init__":
            continue  # the public API gathers names from every layer
        for imported in imported_units(path) - {unit}:
            if LAYERS[imported] > LAYERS[unit]:
                where = path.relative_to(PACKAGE)
                broken.append(f"{where} ({unit}, layer {LAYERS[unit]}) imports {imported} (layer {LAYERS[imported]})")
    assert not broken


def test_importing_asyncserve_loads_no_server_or_model_library() -> None:
    code = (
        "import sys, asyncserve; "
        "heavy = [m for m in ('uvicorn', 'sklearn', 'tokenizers', 'httpx', 'prometheus_client', 'grpc', "
        "'google.protobuf') if m in sys.modules]; "
        "print(heavy)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


PUBLIC_SUBMODULES = {
    "numpy.typing", "prometheus_client.core", "prometheus_client.exposition", "prometheus_client.metrics_core",
    "prometheus_client.parser", "prometheus_client.registry", "prometheus_client.utils", "redis.asyncio",
    "redis.asyncio.retry", "redis.backoff", "safetensors.numpy", "sklearn.datasets", "sklearn.linear_model",
    "sklearn.pipeline", "sklearn.preprocessing",
    # OpenTelemetry's API and SDK reference (opentelemetry-python.readthedocs.io) documents each of these.
    "opentelemetry.context", "opentelemetry.trace", "opentelemetry.sdk.resources", "opentelemetry.sdk.trace",
    "opentelemetry.sdk.trace.export", "opentelemetry.exporter.otlp.proto.http.trace_exporter",
    # protobuf's Python API reference (googleapis.dev/python/protobuf/latest) documents both: the gRPC method table
    # is read from service descriptors, and requests are parsed as Messages.
    "google.protobuf.descriptor", "google.protobuf.message",
}  # fmt: skip
"""Submodules of dependencies that their documentation presents as public API. A module missing here (say
uvicorn.protocols.http.httptools_impl) is an implementation detail: add it only if its library documents it."""


def written_modules() -> list[Path]:
    """The package's modules but those protoc generates (src/asyncserve/grpc/*_pb2*.py): generated code uses
    protobuf's and grpc's internals by their design, and is checked by regenerating it (tests/grpc/test_proto.py)."""
    return sorted(path for path in PACKAGE.rglob("*.py") if "_pb2" not in path.name)


def test_dependencies_are_used_through_their_documented_modules() -> None:
    used: set[str] = set()
    for path in written_modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                used.add(node.module)
            elif isinstance(node, ast.Import):
                used.update(alias.name for alias in node.names)
    submodules = {m for m in used if "." in m and m.split(".")[0] not in (*sys.stdlib_module_names, "asyncserve")}
    assert submodules <= PUBLIC_SUBMODULES, submodules - PUBLIC_SUBMODULES


def _is_dependency(module: str) -> bool:
    top = module.split(".")[0]
    return top != "asyncserve" and top not in sys.stdlib_module_names


def _is_private(name: str) -> bool:
    return any(part.startswith("_") and not part.startswith("__") for part in name.split("."))


def private_imports(tree: ast.AST) -> tuple[list[str], set[str]]:
    """Imports of a dependency's private module or name, and the names its modules are bound to."""
    found: list[str] = []
    aliases: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            # The standard library documents its underscore names it means for use (os._exit, sys._getframe).
            external = [alias for alias in node.names if _is_dependency(alias.name)]
            aliases.update(alias.asname or alias.name.split(".")[0] for alias in external)
            found.extend(f"import {alias.name}" for alias in external if _is_private(alias.name))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if not _is_dependency(node.module):
                continue
            if _is_private(node.module) or any(_is_private(alias.name) for alias in node.names):
                found.append(f"from {node.module} import {', '.join(a.name for a in node.names)}")
    return found, aliases


def private_uses_of_dependencies(path: Path) -> list[str]:
    """Imports of a dependency's private module or name, and ``module._name`` on an imported dependency."""
    tree = ast.parse(path.read_text())
    found, aliases = private_imports(tree)
    for node in ast.walk(tree):
        on_dependency = (
            isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
        )
        if on_dependency and _is_private(node.attr):  # type: ignore[attr-defined]
            found.append(f"{node.value.id}.{node.attr}")  # type: ignore[attr-defined]
    return found


def test_no_module_uses_a_private_module_or_name_of_a_dependency() -> None:
    used = {
        str(path.relative_to(PACKAGE)): uses
        for path in written_modules()
        if (uses := private_uses_of_dependencies(path))
    }
    assert not used
