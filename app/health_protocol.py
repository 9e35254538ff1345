"""uvicorn's HTTP protocol, answering `GET /healthz` as soon as its headers are parsed.

Under a saturating load the event loop's queue holds a turn's worth of requests, and a liveness
probe that goes through the application waits two turns behind them (about 130 ms for 200
closed-loop connections on one process). The answer of `/healthz` is fixed ("the process and its
event loop are alive"), so this protocol writes it from the callback that parsed the request, one
turn earlier, without a task or the middleware stack. A frozen loop still fails the probe: the
callback runs on the same loop.

The route in app.api.health stays for the OpenAPI document, the test client and other servers.
"""

from __future__ import annotations

from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

HEALTH_PATH = "/healthz"
HEALTH_BODY = b'{"status":"ok"}'  # what the route returns, byte for byte


class FastHealthProtocol(HttpToolsProtocol):
    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        scope = cycle.scope
        if scope["path"] != HEALTH_PATH or scope["method"] not in ("GET", "HEAD"):
            super()._start_asgi_task(cycle, app)
            return
        head = [b"HTTP/1.1 200 OK\r\n"]
        for name, value in cycle.default_headers:  # server, date (as every other response)
            head += [name, b": ", value, b"\r\n"]
        head += [b"content-type: application/json\r\ncontent-length: ", str(len(HEALTH_BODY)).encode(), b"\r\n"]
        if not cycle.keep_alive:
            head.append(b"connection: close\r\n")
        head.append(b"\r\n")
        body = b"" if scope["method"] == "HEAD" else HEALTH_BODY
        self.transport.write(b"".join(head) + body)
        cycle.response_started = cycle.response_complete = True
        if not cycle.keep_alive:
            self.transport.close()
        self.on_response_complete()  # keep-alive timer, or the next pipelined request
