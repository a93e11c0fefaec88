"""The public API is short, sorted and complete, and the modules keep to the import rules."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import asyncserve

PACKAGE = Path(asyncserve.__file__).parent

LAYERS = {
    "exceptions": 0, "tensors": 0, "config": 0, "metrics": 0, "_utils": 0, "cache": 0, "calls": 0,
    "features": 1, "predlog": 1, "jobs": 1, "ensemble": 1, "lazy": 1, "peers": 1,
    "model": 1, "executor": 1, "batching": 1, "cost": 1,
    "registry": 2,
    "service": 3, "pipeline": 3,
    "jobs_api": 4, "inference": 4, "submit": 4, "inputfiles": 4, "disconnects": 4, "protocol": 4,
    "v2": 4, "jsonapi": 4, "openapi": 4, "routing": 4, "app": 4, "server": 4, "cli": 4, "demo": 4, "minilm": 4,
    "__main__": 4,
}  # fmt: skip
"""leaves 0, engines 1, domain 2, composition 3, edges 4: a module imports only from its layer or below.
A sub-package (a family of backends) counts as one module."""

SUBPACKAGES = {"features", "predlog", "jobs"}

SAME_LAYER_FORBIDDEN = {("service", "pipeline"), ("pipeline", "service")}


def test_all_is_sorted_and_every_name_exists() -> None:
    assert asyncserve.__all__ == sorted(asyncserve.__all__)
    for name in asyncserve.__all__:
        assert hasattr(asyncserve, name), name


def test_every_module_has_a_layer() -> None:
    modules = {path.stem for path in PACKAGE.glob("*.py") if path.stem != "__init__"}
    packages = {path.name for path in PACKAGE.iterdir() if path.is_dir() and any(path.glob("*.py"))}
    assert modules | packages == set(LAYERS)
    assert packages == SUBPACKAGES


def module_files(module: str) -> list[Path]:
    if module in SUBPACKAGES:
        return sorted((PACKAGE / module).glob("*.py"))
    return [PACKAGE / f"{module}.py"]


def imported_modules(path: Path) -> set[str]:
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
    for module, layer in LAYERS.items():
        imports = set().union(*(imported_modules(path) for path in module_files(module))) - {module}
        for imported in imports:
            if LAYERS[imported] > layer or (module, imported) in SAME_LAYER_FORBIDDEN:
                broken.append(f"{module} (layer {layer}) imports {imported} (layer {LAYERS[imported]})")
    assert not broken


def test_importing_asyncserve_loads_no_server_or_model_library() -> None:
    code = (
        "import sys, asyncserve; "
        "heavy = [m for m in ('uvicorn', 'sklearn', 'tokenizers', 'httpx', 'prometheus_client') if m in sys.modules]; "
        "print(heavy)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
