"""asyncserve: serve machine-learning predictions from an asyncio event loop that never blocks.

Layout and import rules (checked by tests/test_exports.py):
- leaves import nothing from the package but other leaves: exceptions, tensors, config, metrics, _utils;
- engines import leaves and each other: model, executor, batching, cost;
- domain: registry; composition: service;
- edges import anything above: v2, jsonapi, openapi, routing, app, server, cli, demo, minilm.
Importing asyncserve loads no model library, opens no socket and configures no logging.
"""

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
from asyncserve.lazy import LazyPrediction
from asyncserve.model import Model
from asyncserve.service import Service
from asyncserve.tensors import Datatype, Tensor

__version__ = "0.1.0"

__all__ = [
    "AsyncServeError",
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
]
