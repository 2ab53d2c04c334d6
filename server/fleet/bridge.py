"""One HTTP request carried across a Ray Serve handle call, as ASGI messages.

The ingress (`forward`) reads the client's request, sends its head and body to a replica, and relays what comes
back; the replica (`serve_asgi`) runs the unchanged svdserve FastAPI app on that request and yields the app's
ASGI `send` messages as they are produced, so a streamed completion streams through. Messages already waiting
are yielded together (a JSON response's start and body travel as one item). When the consumer stops early — the
client went away and Ray Serve cancelled the call — the app is told `http.disconnect`, exactly as uvicorn tells
it, so its own disconnect handling aborts the engine requests; it is cancelled only if it does not end by itself.

Ray-free on purpose: both halves are plain asyncio and are tested without a cluster.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import error_body, error_response

log = logging.getLogger(__name__)

APP_EXIT_GRACE_S = 5.0  # after a disconnect, how long the app may take to clean up before it is cancelled


@dataclass
class Head:
    """The picklable part of an HTTP scope: what a replica needs to rebuild it."""

    method: str
    path: str
    raw_path: bytes
    query_string: bytes
    headers: list[tuple[bytes, bytes]]
    scheme: str = "http"
    http_version: str = "1.1"
    client: tuple[str, int] | None = None
    server: tuple[str, int] | None = None

    @classmethod
    def of(cls, scope: Scope) -> Head:
        return cls(method=scope["method"], path=scope["path"], raw_path=scope.get("raw_path") or scope["path"].encode(),
                   query_string=scope.get("query_string", b""), headers=[tuple(h) for h in scope["headers"]],
                   scheme=scope.get("scheme", "http"), http_version=scope.get("http_version", "1.1"),
                   client=tuple(scope["client"]) if scope.get("client") else None,
                   server=tuple(scope["server"]) if scope.get("server") else None)

    def header(self, name: bytes) -> bytes | None:
        return next((v for k, v in self.headers if k.lower() == name), None)

    def scope(self) -> Scope:
        return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": self.http_version,
                "method": self.method, "scheme": self.scheme, "path": self.path, "raw_path": self.raw_path,
                "root_path": "", "query_string": self.query_string, "headers": self.headers,
                "client": self.client, "server": self.server, "state": {}}


async def serve_asgi(app: ASGIApp, head: Head, body: bytes,
                     add_headers: list[tuple[bytes, bytes]] = ()) -> AsyncIterator[list[Message]]:
    """Run `app` on one request; yield its messages in batches. `add_headers` go on the response start."""
    queue: asyncio.Queue[Message | None] = asyncio.Queue()
    gone = asyncio.Event()
    delivered = False

    async def receive() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start" and add_headers:
            message = {**message, "headers": [*message.get("headers", []), *add_headers]}
        queue.put_nowait(message)

    async def run() -> None:
        try:
            await app(head.scope(), receive, send)
        finally:
            queue.put_nowait(None)

    task, started = asyncio.create_task(run()), False
    try:
        while True:
            batch = [await queue.get()]
            while not queue.empty():
                batch.append(queue.get_nowait())
            done = batch[-1] is None
            if messages := [m for m in batch if m is not None]:
                started = started or any(m["type"] == "http.response.start" for m in messages)
                yield messages
            if done:
                break
        await asyncio.wait({task})
        if (exc := task.exception()) is not None:  # as uvicorn does: log it, and answer 500 if nothing went out
            log.error("exception in the app on %s %s", head.method, head.path, exc_info=exc)
            if not started:
                yield _internal_error()
    finally:
        gone.set()
        if not task.done():
            await asyncio.wait({task}, timeout=APP_EXIT_GRACE_S)
            task.cancel()


def _internal_error() -> list[Message]:
    body = json.dumps(error_body(500, "internal error in the replica")).encode()
    return [{"type": "http.response.start", "status": 500, "headers": [(b"content-type", b"application/json")]},
            {"type": "http.response.body", "body": body}]


Call = Callable[[Head, bytes], AsyncIterator[list[Message]]]


class RequestTooLarge(Exception):
    pass


async def read_body(receive: Receive, max_bytes: int, timeout_s: float) -> bytes | None:
    """The whole request body, or None when the client disconnected first. Raises RequestTooLarge beyond
    `max_bytes` and TimeoutError when the client sends nothing for `timeout_s`."""
    chunks, size = [], 0
    while True:
        message = await asyncio.wait_for(receive(), timeout_s)
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > max_bytes:
            raise RequestTooLarge(f"request body exceeds the fleet ingress's limit of {max_bytes} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def forward(scope: Scope, receive: Receive, send: Send, call: Call, *, max_bytes: int,
                  timeout_s: float) -> None:
    """Relay one client request through `call` (a replica). Body over `max_bytes`: 413; stalled body: 408."""
    head = Head.of(scope)
    try:
        body = await read_body(receive, max_bytes, timeout_s)
    except RequestTooLarge as exc:
        await error_response(413, str(exc), headers={"Connection": "close"})(scope, receive, send)
        return
    except TimeoutError:
        await error_response(408, f"the request body stalled for {timeout_s:g} s",
                             headers={"Connection": "close"})(scope, receive, send)
        return
    if body is None:
        return
    async for messages in call(head, body):
        for message in messages:
            await send(message)
