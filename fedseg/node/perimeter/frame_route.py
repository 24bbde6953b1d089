"""fedseg's own HTTP route for a call's frames (see :mod:`.frame_stage` for why they do not ride inside Syft).

``POST /fedseg/frames`` stages a request frame and answers its SHA-256 (hex);
``GET /fedseg/frames/<sha256>`` hands out a reply frame once. Only peers that passed the
node's mutual-TLS handshake reach it (the coordinator of the invite and the node itself).
A body over the node's message limit is refused before it is read in full, with HTTP 413
and the node's typed ``bad_message`` reply as the body, as the action would have answered.
"""
from __future__ import annotations

import re
from typing import Any

from fedseg.protocol.messages import ErrorCode, ErrorReply, encode
from fedseg.protocol.syft_action import FRAMES_ROUTE

from .frame_stage import STAGE

__all__ = ["answer", "is_frame_route", "serve_frame_route"]

_REPLY = re.compile(re.escape(FRAMES_ROUTE) + "/([0-9a-f]{64})")


def is_frame_route(path: str) -> bool:
    return path == FRAMES_ROUTE or path.startswith(FRAMES_ROUTE + "/")


async def answer(send: Any, status: int, body: bytes, content_type: bytes = b"text/plain") -> None:
    """Answers an ASGI request with one whole body."""
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def _too_large(send: Any, text: str) -> None:
    await answer(send, 413, encode(ErrorReply(code=ErrorCode.BAD_MESSAGE.value, message=text)), b"application/octet-stream")


async def serve_frame_route(scope: dict[str, Any], receive: Any, send: Any, max_bytes: int, refuse: Any) -> None:
    """Serves one request to the frame route.

    Args:
        scope, receive, send: The ASGI request.
        max_bytes: The node's message limit.
        refuse: ``refuse(what, reason) -> text``: logs a refusal with the peer and returns its answer.
    """
    method, path = scope.get("method", ""), scope["path"]
    what = f"{method} {path}"
    if method == "POST" and path == FRAMES_ROUTE:
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared and (not declared.isdigit() or int(declared) > max_bytes):
            await _too_large(send, refuse(what, f"frame of {declared.decode(errors='replace')} bytes exceeds the limit of {max_bytes} bytes"))
            return
        chunks, size = [], 0
        while True:
            event = await receive()
            if event["type"] == "http.disconnect":
                return
            chunk = event.get("body", b"")
            size += len(chunk)
            if size > max_bytes:
                await _too_large(send, refuse(what, f"frame of more than {max_bytes} bytes exceeds the limit of {max_bytes} bytes"))
                return
            chunks.append(chunk)
            if not event.get("more_body", False):
                break
        await answer(send, 200, STAGE.requests.put(b"".join(chunks)).encode())
        return
    match = _REPLY.fullmatch(path)
    if method == "GET" and match:
        frame = STAGE.replies.take(match.group(1))
        if frame is None:
            await answer(send, 404, refuse(what, "no such reply: fetched already, or expired").encode())
            return
        await answer(send, 200, frame, b"application/octet-stream")
        return
    await answer(send, 405 if path == FRAMES_ROUTE or match else 404, refuse(what, "only POST /fedseg/frames and GET /fedseg/frames/<sha256> are served").encode())
