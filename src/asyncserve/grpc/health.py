"""``grpc.health.v1.Health``: the gRPC health checking protocol, for Kubernetes' gRPC probes,
grpc_health_probe and load balancers.

``Check`` answers SERVING while the server is ready (``/v2/health/ready``'s rule: models loaded,
feature sources healthy, not shutting down) and NOT_SERVING otherwise, for the server as a whole
(``service`` empty) or for ``inference.GRPCInferenceService``; another service is NOT_FOUND, as
the protocol says. ``Watch`` is not served: clients get UNIMPLEMENTED and fall back to ``Check``.
"""

from __future__ import annotations

from asyncserve.grpc import health_pb2 as pb
from asyncserve.grpc.calls import Call
from asyncserve.grpc.status import GrpcError, StatusCode
from asyncserve.http.app import HttpApp

SERVICES = frozenset(("", "inference.GRPCInferenceService"))


class HealthServicer:
    def __init__(self, http: HttpApp) -> None:
        self.http = http

    def Check(self, request: pb.HealthCheckRequest, context: Call) -> pb.HealthCheckResponse:
        if request.service not in SERVICES:
            raise GrpcError(StatusCode.NOT_FOUND, f"unknown service {request.service!r}: ask for '' (the server)")
        status = pb.HealthCheckResponse.SERVING if self.http.serving() else pb.HealthCheckResponse.NOT_SERVING
        return pb.HealthCheckResponse(status=status)
