"""The floor of a gRPC call in Python: a bare ``grpc.aio`` server on uvloop that answers every ModelInfer with
the same pre-serialized response, without decoding the request (``benchmarks.grpc`` measures it as ``grpc-bare``).

What it costs per call is grpc.aio's own CPU (HTTP/2, the completion queue, the hand-off to the event loop),
which no server built on grpc.aio can go below::

    python -m benchmarks.grpc_floor --port 50051
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Sequence
from typing import Any

import grpc
import numpy as np
import uvloop

from asyncserve.grpc import inference_pb2 as pb
from benchmarks import mlp


def response_bytes() -> bytes:
    """What the MLP answers for one row: 16 FP32 values, raw."""
    response = pb.ModelInferResponse(model_name="mlp", raw_output_contents=[np.zeros(mlp.OUTPUT_SIZE, "<f4").tobytes()])
    response.outputs.add(name="y", datatype="FP32", shape=[1, mlp.OUTPUT_SIZE])
    return response.SerializeToString()


async def serve(port: int) -> None:
    answer = response_bytes()

    async def infer(request: bytes, context: Any) -> bytes:
        return answer

    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler(
        "inference.GRPCInferenceService", {"ModelInfer": grpc.unary_unary_rpc_method_handler(infer)}
    )
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    uvloop.run(serve(parser.parse_args(argv).port))


if __name__ == "__main__":
    main()
