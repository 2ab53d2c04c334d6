"""Server-sent events that always release their request.

Starlette cancels a StreamingResponse when the client disconnects but leaves its body iterator suspended,
to be closed by the garbage collector some time later. `ClosingStreamingResponse` closes it at once (shielded
from the cancellation), so the iterator's `finally` aborts the engine requests and frees their batch slots.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import anyio
from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Send


class ClosingStreamingResponse(StreamingResponse):
    async def stream_response(self, send: Send) -> None:
        try:
            await super().stream_response(send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True):
                    await aclose()


def sse(body: AsyncIterator[str]) -> ClosingStreamingResponse:
    return ClosingStreamingResponse(body, media_type="text/event-stream",
                                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def event(data: BaseModel | dict) -> str:
    text = data.model_dump_json() if isinstance(data, BaseModel) else json.dumps(data)
    return f"data: {text}\n\n"


DONE = "data: [DONE]\n\n"
