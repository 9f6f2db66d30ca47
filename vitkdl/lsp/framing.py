"""The language server's stdio framing: LSP base-protocol messages read so that no input can hang
or kill the server, and every request that can be answered is answered.

pygls 2.1.1's reader waits for a header it can parse, so a non-numeric or wrong
``Content-Length``, or a body sent without a header, glues every later message to the bad one (the
server stays alive and silent), and it reads ``Content-Length`` bytes in one allocation (a large
one kills it with ``MemoryError``). Here:

- :class:`FrameReader` reads one message at a time through its own buffer: a message is at most
  :data:`MAX_MESSAGE_BYTES`; after bad framing it resynchronises on the next ``Content-Length:``;
  a body whose JSON ends before the declared length gives the rest back to the stream (the length
  was too long), a body that is not JSON is given back whole (it was too short, or not a body).
- :func:`dispatch` hands a good message to pygls and answers what pygls cannot: a parse error
  (-32700), an invalid request (-32600) and, for a request, parameters of the wrong types (-32602)
  get a JSON-RPC error, with the request's id when one can be read, ``null`` otherwise.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from typing import Any, BinaryIO, Protocol

logger = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
"""The largest message body read (a whole recipe is a few KiB; a didOpen of a big file, MiB)."""
MAX_HEADER_BYTES = 64 * 1024
"""The longest header line (a real one is about 40 bytes); longer is bad framing."""
CHUNK = 64 * 1024  # a pipe's buffer: what one read returns at most anyway

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603

_HEADER_NAME = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_CONTENT_LENGTH = re.compile(rb"content-length:", re.IGNORECASE)
# The id of a request whose bytes do not parse: only before any nested object or array, where a
# client writes it (vscode-jsonrpc: jsonrpc, id, method, params), so a nested "id" is never taken.
_TOP_ID = re.compile(rb'\A\s*\{[^{}\[\]]*?"id"\s*:\s*(-?\d{1,18}|"(?:[^"\\\r\n]|\\.){0,200}")')


class _LineTooLong(Exception):
    """A header line over :data:`MAX_HEADER_BYTES` (left in the buffer)."""


class _Writer(Protocol):
    def write(self, data: bytes) -> Any: ...


@dataclass(frozen=True)
class Frame:
    """One message read: its decoded JSON value, or the error to answer instead."""

    message: Any = None
    code: int = 0
    """0 for a message; else the JSON-RPC error code to answer with."""
    error: str = ""
    id: int | str | None = None
    """For an error: the request's id where the bytes show one."""


def _show(raw: bytes, limit: int = 60) -> str:
    text = raw[:limit].decode("utf-8", "replace")
    return repr(text) + ("..." if len(raw) > limit else "")


def _id_in(raw: bytes) -> int | str | None:
    """The id of a request in bytes that do not parse as JSON, when it stands at the top."""
    match = _TOP_ID.match(raw)
    if match is None:
        return None
    try:
        value = json.loads(match.group(1))
    except ValueError:
        return None
    return _valid_id(value)


def _valid_id(value: Any) -> int | str | None:
    """``value`` if it can be a request's id (an integer or a string), else None."""
    return value if isinstance(value, int | str) and not isinstance(value, bool) else None


class FrameReader:
    """Read LSP messages (``Content-Length`` framing) from a binary stream, one per :meth:`read`.

    Blocking; meant for a reader thread. Memory is bounded by ``limit`` plus one chunk.
    """

    def __init__(self, stream: BinaryIO, limit: int = MAX_MESSAGE_BYTES) -> None:
        # read1: what a pipe has now, so a message is handled without waiting for a full chunk.
        self._read = getattr(stream, "read1", stream.read)
        self.limit = limit
        self._buffer = bytearray()
        self._eof = False
        self._resync: int | None = None  # where to start looking for the next header, if lost

    def _fill(self, want: int = CHUNK) -> bool:
        """Append what the stream has (up to ``want`` bytes); False at the end of the stream."""
        if self._eof:
            return False
        chunk = self._read(max(1, min(want, CHUNK)))
        if not chunk:
            self._eof = True
            return False
        self._buffer += chunk
        return True

    def _line(self) -> bytes | None:
        """The next line with its end; None at the end of the stream."""
        start = 0
        while True:
            end = self._buffer.find(b"\n", start)
            if end > MAX_HEADER_BYTES or (end < 0 and len(self._buffer) > MAX_HEADER_BYTES):
                raise _LineTooLong  # left in the buffer: resynchronising scans it
            if end >= 0:
                line = bytes(self._buffer[: end + 1])
                del self._buffer[: end + 1]
                return line
            start = len(self._buffer)
            if not self._fill():
                return None

    def _take(self, n: int) -> bytes | None:
        """Exactly ``n`` bytes; None if the stream ends first."""
        while len(self._buffer) < n:
            if not self._fill(n - len(self._buffer)):
                return None
        body = bytes(self._buffer[:n])
        del self._buffer[:n]
        return body

    def _skip_to_header(self, start: int) -> bool:
        """Drop bytes up to the next ``Content-Length:``; False at the end of the stream."""
        keep = len(b"content-length:") - 1  # a header split across two reads
        while True:
            match = _CONTENT_LENGTH.search(self._buffer, start)
            if match is not None:
                del self._buffer[: match.start()]
                return True
            del self._buffer[: max(start, len(self._buffer) - keep)]
            start = 0
            if not self._fill():
                return False

    def _lost(
        self,
        error: str,
        *,
        code: int = PARSE_ERROR,
        again: bytes = b"",
        at: int = 0,
        request: int | str | None = None,
    ) -> Frame:
        """Bad framing: give ``again`` back to the stream, resynchronise from ``at`` in it."""
        self._buffer[:0] = again
        self._resync = at
        return Frame(code=code, error=error, id=request)

    def read(self) -> Frame | None:
        """The next message, or the error it gives; None at the end of the stream."""
        if self._resync is not None:
            start, self._resync = self._resync, None
            if not self._skip_to_header(start):
                return None
        length: int | None = None
        length_text = ""
        seen = b""  # the header lines so far
        while True:
            try:
                raw = self._line()
            except _LineTooLong:
                return self._lost(f"a header line longer than {MAX_HEADER_BYTES} bytes", at=1)
            if raw is None:
                return None  # a message cut short by the end of the stream: nobody to answer
            line = raw.rstrip(b"\r\n")
            if not line.strip():
                if seen:
                    seen += raw
                    break
                continue  # blank lines between messages
            seen += raw
            if len(seen) > MAX_HEADER_BYTES:  # endless header lines: dropped, not given back
                return self._lost(f"headers longer than {MAX_HEADER_BYTES} bytes")
            name, colon, value = line.partition(b":")
            if not colon or not _HEADER_NAME.fullmatch(name):
                return self._lost(
                    f"not a header line: {_show(line)}",
                    again=raw,
                    at=1,
                    request=_id_in(line),
                )
            if name.lower() == b"content-length":
                value = value.strip()
                if not value.isdigit():
                    # Given back: the line may run on into the next message's header.
                    error = f"Content-Length is not a number: {_show(value)}"
                    return self._lost(error, again=raw, at=1)
                # The digit count first: int() of thousands of digits raises ValueError.
                length = self.limit + 1 if len(value) > 18 else int(value)
                length_text = value.decode()
        if length is None:  # given back: a header cut short may run on into the next one
            return self._lost("a message without a Content-Length header", again=seen, at=1)
        if length > self.limit:
            return self._lost(
                f"a message of {length_text} bytes: over the limit of {self.limit}",
                code=INVALID_REQUEST,
            )
        body = self._take(length)
        return None if body is None else self._decode(body, length)

    def _decode(self, body: bytes, length: int) -> Frame:
        try:
            return Frame(message=json.loads(body.decode("utf-8")))
        except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
            pass
        # Not JSON as a whole: JSON followed by other bytes says the length was too long (the rest
        # is the next message's start); otherwise it was too short, or this is no message body.
        text = body.decode("utf-8", "surrogateescape")
        start = len(text) - len(text.lstrip())
        try:
            value, end = json.JSONDecoder().raw_decode(text, start)
            used = len(text[:end].encode("utf-8", "surrogateescape"))
            body[:used].decode("utf-8")
        except (ValueError, RecursionError):
            used = length
        if used == length:
            return self._lost(
                f"the body of {length} bytes is not UTF-8 JSON (a wrong Content-Length?)",
                again=body,
                request=_id_in(body),
            )
        request = value.get("id") if isinstance(value, dict) and "method" in value else None
        return self._lost(
            f"Content-Length {length} does not match the message: JSON of {used} bytes, "
            f"then {length - used} other bytes",
            again=body[used:],
            request=_valid_id(request),
        )


def error_response(writer: _Writer, request: int | str | None, code: int, message: str) -> None:
    """Write a JSON-RPC error answer (``id`` null where the request's id is unknown)."""
    body = json.dumps(
        {"jsonrpc": "2.0", "id": request, "error": {"code": code, "message": message}}
    ).encode("utf-8")
    writer.write(b"Content-Length: %d\r\n\r\n" % len(body) + body)


def _invalid(message: Any) -> tuple[str, int | str | None] | None:
    """Why ``message`` is not a JSON-RPC 2.0 message, and the id to answer; None if it is one."""
    if not isinstance(message, dict):
        return f"a message is a JSON object, not {type(message).__name__}", None
    answer_to = _valid_id(message.get("id"))
    has_id = answer_to is not None
    if message.get("jsonrpc") != "2.0":
        return 'a message needs "jsonrpc": "2.0"', answer_to
    if "method" in message:
        if not isinstance(message["method"], str):
            return '"method" is not a string', answer_to
        if "id" in message and not has_id:
            return '"id" is not an integer or a string', None
    elif "id" not in message:
        return 'a message needs a "method", or an "id" (a response)', None
    return None


def _params_error(exc: BaseException) -> str:
    """A one-line account of why a message's parameters do not have the protocol's types."""
    cause = exc.__cause__ or exc
    try:
        from cattrs import transform_error

        details = transform_error(cause)  # e.g. "expected int @ $.params.position.line"
    except Exception:
        details = [str(cause)]
    return "; ".join(details[:3]) or type(cause).__name__


def dispatch(server: Any, frame: Frame, writer: _Writer) -> None:
    """Handle one frame with the pygls ``server``: an error answered, or the message handled."""
    protocol = server.protocol
    if frame.code:
        logger.warning("bad message: %s", frame.error)
        error_response(writer, frame.id, frame.code, frame.error)
        return
    message = frame.message
    invalid = _invalid(message)
    if invalid is not None:
        logger.warning("invalid message: %s", invalid[0])
        error_response(writer, invalid[1], INVALID_REQUEST, invalid[0])
        return
    method = message.get("method")
    is_request = method is not None and "id" in message
    if is_request and getattr(protocol, "_shutdown", False) and method != "exit":
        # The protocol: requests after shutdown "should error with InvalidRequest" (pygls drops
        # them, so the client would wait forever).
        error_response(writer, message["id"], INVALID_REQUEST, "the server is shutting down")
        return
    try:
        structured = protocol.structure_message(message)
    except Exception as exc:
        why = _params_error(exc)
        logger.warning("invalid params for %s: %s", method, why)
        if is_request:
            error_response(writer, message["id"], INVALID_PARAMS, f"invalid params: {why}")
        else:  # a notification has nobody waiting: tell the user, as pygls does
            server._report_server_error(exc, type(exc))
        return
    try:
        protocol.handle_message(structured)
    except Exception as exc:  # pygls answers a failing request itself; this is a safety net
        logger.exception("unable to handle %s", method)
        server._report_server_error(exc, type(exc))
