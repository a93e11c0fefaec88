"""The Open Inference Protocol (V2) over gRPC: ``inference.GRPCInferenceService`` on its own port.

Served from the same event loop as HTTP, on asyncserve's own HTTP/2 connections (``http2``) and gRPC
calls (``calls``); every call goes through the same admission, decoding checks, pipeline, metrics and
error mapping as REST (see docs/architecture.md). The modules ``inference_pb2*`` are generated from
``inference.proto`` (``make proto``); serving needs protobuf and hpack (``asyncserve[grpc]``), not
grpcio, whose stubs in ``inference_pb2_grpc`` are for Python clients. Nothing here is imported unless
``grpc_port`` is set.
"""

from __future__ import annotations

from importlib.util import find_spec

from asyncserve.exceptions import ConfigurationError


def require_grpc() -> None:
    """Raise a one-line ConfigurationError when protobuf or hpack is not installed."""
    try:
        missing = find_spec("hpack") is None or find_spec("google.protobuf") is None
    except ModuleNotFoundError:  # no google package at all
        missing = True
    if missing:
        raise ConfigurationError(
            "--grpc-port needs gRPC support, which is not installed: pip install 'asyncserve[grpc]'"
        )
