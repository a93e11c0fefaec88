"""The HTTP protocol: uvicorn's httptools protocol, refusing inference requests at the parser when the loop is swamped.

Under overload, refusing must cost far less than serving, or the refusals alone keep the event loop
swamped and nothing is served in time. Through ASGI, even a refusal costs a task, a scope, two
messages and two writes: about as much as a small prediction. Here an inference request that the
app refuses for the loop's lag (``AsyncServeApp.refusal``) is answered from the parser callback
with one write and no task; its body, if still coming, is parsed and dropped. Every other request,
and every request when the loop keeps up, goes through uvicorn unchanged.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle

if TYPE_CHECKING:
    from asyncserve.app import AsyncServeApp

logger = logging.getLogger(__name__)


class SheddingHttpToolsProtocol(HttpToolsProtocol):
    """``HttpToolsProtocol`` that asks the app, once the headers are in, whether to refuse the request at once.

    It builds on uvicorn's internals (``RequestResponseCycle``, ``STATUS_LINE``). Should a uvicorn
    release change them, the refusals fall back to the app's own, through ASGI, with one warning.
    """

    fast_refusals = True

    def on_headers_complete(self) -> None:
        app: AsyncServeApp = self.config.app  # type: ignore[assignment]
        current: RequestResponseCycle | None = self.cycle  # None before the first request
        pipelined = current is not None and not current.response_complete
        refusal = None
        if self.fast_refusals and not pipelined:  # pipelined requests keep their order: they go through uvicorn
            refusal = app.refusal(self.parser.get_method(), self.url, self.headers)
        if refusal is None:
            super().on_headers_complete()
            return
        try:
            self._refuse(*refusal)
        except (AttributeError, KeyError, TypeError):
            logger.warning("refusing at the HTTP parser does not work with this uvicorn; refusing through ASGI")
            type(self).fast_refusals = False
            super().on_headers_complete()

    def _refuse(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        # A client that waits for "100 Continue" before its body may send it anyway or not: close.
        keep_alive = (
            self.parser.get_http_version() != "1.0" and self.parser.should_keep_alive() and not self.expect_100_continue
        )
        cycle = RequestResponseCycle(
            scope=self.scope, transport=self.transport, flow=self.flow, logger=self.logger,
            access_logger=self.access_logger, access_log=self.access_log,
            default_headers=self.server_state.default_headers, message_event=asyncio.Event(),
            expect_100_continue=False, keep_alive=keep_alive, on_response=self.on_response_complete,
        )  # fmt: skip
        cycle.response_started = cycle.response_complete = True  # the body that follows is dropped
        self.cycle = cycle
        content = [STATUS_LINE[status]]
        for name, value in [*self.server_state.default_headers, *headers]:
            content.extend([name, b": ", value, b"\r\n"])
        content.append(b"content-length: %d\r\n" % len(body))
        if not keep_alive:
            content.append(b"connection: close\r\n")
        content.extend([b"\r\n", body])
        self.transport.write(b"".join(content))
        if keep_alive:
            self.on_response_complete()
        else:
            self.transport.close()
