"""What the HTTP layer checks before a route runs: the size of JSON bodies, read with a deadline, and the
methods a path answers (`Options`).

`BodyLimit` buffers a JSON request's body up to `--max-request-bytes` (413 beyond it, from Content-Length at
once or while reading) and drops a client that stalls for `--upload-timeout-seconds` (408), then hands the
body to the app. Adapter uploads (PUT /adapters/…) stream to the store with limits of their own.
"""

from __future__ import annotations

import anyio
from fastapi.responses import Response
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import error_response


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float):
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE") or (
                scope["method"] == "PUT" and scope["path"].startswith("/adapters/")):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await _refuse(scope, receive, send, 413, f"request body of {int(declared)} bytes exceeds the limit of "
                                                     f"{self.max_bytes} bytes (--max-request-bytes)")
            return
        chunks, size = [], 0
        while True:
            with anyio.move_on_after(self.timeout_s) as timer:
                message = await receive()
            if timer.cancelled_caught:
                await _refuse(scope, receive, send, 408, f"the request body stalled for {self.timeout_s:g} s")
                return
            if message["type"] == "http.disconnect":
                return
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                await _refuse(scope, receive, send, 413, f"request body exceeds the limit of {self.max_bytes} "
                                                         "bytes (--max-request-bytes)")
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body, sent = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # the disconnect, when the client goes

        await self.app(scope, replay, send)


async def _refuse(scope: Scope, receive: Receive, send: Send, status: int, message: str) -> None:
    await error_response(status, message, headers={"Connection": "close"})(scope, receive, send)


class Options:
    """OPTIONS answers the methods a path has, in `Allow` (204), or 404 for a path no route has."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "OPTIONS":
            await self.app(scope, receive, send)
            return
        routes = scope["app"].routes
        methods = {m for m in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")
                   if any(route.matches(dict(scope, method=m))[0] is Match.FULL for route in routes)}
        if not methods:
            await error_response(404, f"no route for {scope['path']}")(scope, receive, send)
            return
        await Response(status_code=204, headers={"Allow": ", ".join(sorted(methods | {"OPTIONS"}))})(
            scope, receive, send)
