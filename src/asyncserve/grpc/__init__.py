"""The Open Inference Protocol (V2) over gRPC: ``inference.GRPCInferenceService`` on its own port.

Served from the same event loop as HTTP with ``grpc.aio``; every call goes through the same admission,
decoding checks, pipeline, metrics and error mapping as REST (see docs/architecture.md). The modules
``inference_pb2*`` are generated from ``inference.proto`` (``make proto``); nothing here imports grpc
unless ``grpc_port`` is set.
"""

from __future__ import annotations

from importlib.util import find_spec

from asyncserve.exceptions import ConfigurationError


def require_grpc() -> None:
    """Raise a one-line ConfigurationError when grpcio or protobuf is not installed."""
    try:
        missing = find_spec("grpc") is None or find_spec("google.protobuf") is None
    except ModuleNotFoundError:  # no google package at all
        missing = True
    if missing:
        raise ConfigurationError(
            "--grpc-port needs gRPC support, which is not installed: pip install 'asyncserve[grpc]'"
        )
