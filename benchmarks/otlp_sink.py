"""A stand-in OpenTelemetry collector for benchmarks: takes OTLP/HTTP trace exports and counts them.

It answers ``POST /v1/traces`` with 200 and throws the spans away, so that a traced server's cost
is measured with its exporter working as against a real collector, and no network beyond loopback::

    .venv/bin/python -m benchmarks.otlp_sink --port 4318 &
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from aiohttp import web


class Sink:
    def __init__(self) -> None:
        self.exports = 0
        self.bytes = 0

    async def traces(self, request: web.Request) -> web.Response:
        self.bytes += len(await request.read())
        self.exports += 1
        return web.Response(body=b"", content_type="application/x-protobuf")

    async def counts(self, request: web.Request) -> web.Response:
        return web.json_response({"exports": self.exports, "bytes": self.bytes})


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.otlp_sink", description=__doc__)
    parser.add_argument("--port", type=int, default=4318)
    args = parser.parse_args(argv)
    sink = Sink()
    app = web.Application()
    app.router.add_post("/v1/traces", sink.traces)
    app.router.add_get("/counts", sink.counts)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
