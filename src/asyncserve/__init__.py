"""asyncserve: serve machine-learning predictions from an asyncio event loop that never blocks.

The layout tells the architecture (checked by tests/test_layout.py, drawn in docs/architecture.md):
leaves (exceptions, tensors, config, metrics, cache, calls) import nothing above them; then the
backend families (features/, predlog/, jobs/); the Model API (model); composition/ (ensembles,
coalescing, caches, deferred predictions); runtime/ (registry, batching, executor, pipeline); the
Service; http/ (the protocol, server, routes and wire formats); and the entry points (app, server,
asgi, cli/, demo/, and client/, the Python client). A module imports only from its own layer or below.
Importing asyncserve loads no model library, opens no socket and configures no logging; the client
(aiohttp) is imported only when ``asyncserve.AsyncClient`` or ``asyncserve.Client`` is first used.
"""

from typing import TYPE_CHECKING, Any

from asyncserve.composition.deferred import LazyPrediction
from asyncserve.config import Settings
from asyncserve.exceptions import (
    AsyncServeError,
    ConfigurationError,
    DeadlineExceeded,
    FeatureTimeout,
    FeatureUnavailable,
    InvalidRequest,
    ModelError,
    ModelNotFound,
    ModelNotReady,
    Overloaded,
    PayloadTooLarge,
    SchemaViolation,
    Unavailable,
    UnsupportedMediaType,
)
from asyncserve.features import Feature
from asyncserve.model import Model
from asyncserve.service import Service
from asyncserve.tensors import Datatype, Tensor

if TYPE_CHECKING:
    from asyncserve.client import AsyncClient, Client

__version__ = "0.1.0"


def serve(service: Service | str, settings: Settings | None = None) -> None:
    """Serve ``service`` (or its ``"module:attribute"``) over HTTP until SIGTERM or SIGINT, then drain and exit.

    Example::

        import asyncserve
        asyncserve.serve(service, asyncserve.Settings(port=8000))
    """
    from asyncserve.server import serve as serve_service  # the server's imports are not paid on import

    serve_service(service, settings)


def __getattr__(name: str) -> Any:
    """``AsyncClient`` and ``Client``, imported on first use: the client needs aiohttp (the ``client`` extra)."""
    if name in ("AsyncClient", "Client"):
        import asyncserve.client  # raises ImportError naming `pip install 'asyncserve[client]'` without aiohttp

        return getattr(asyncserve.client, name)
    raise AttributeError(f"module 'asyncserve' has no attribute {name!r}")


__all__ = [
    "AsyncClient",
    "AsyncServeError",
    "Client",
    "ConfigurationError",
    "Datatype",
    "DeadlineExceeded",
    "Feature",
    "FeatureTimeout",
    "FeatureUnavailable",
    "InvalidRequest",
    "LazyPrediction",
    "Model",
    "ModelError",
    "ModelNotFound",
    "ModelNotReady",
    "Overloaded",
    "PayloadTooLarge",
    "SchemaViolation",
    "Service",
    "Settings",
    "Tensor",
    "Unavailable",
    "UnsupportedMediaType",
    "__version__",
    "serve",
]
