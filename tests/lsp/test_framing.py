"""The language server's framing (issue 17 item 11): hostile bytes on stdin neither hang nor kill
it; each bad message gets a JSON-RPC error and the next good one is answered."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import ROOT

pytest.importorskip("pygls.lsp.server")

from vitkdl.lsp import framing
from vitkdl.lsp.framing import FrameReader
from vitkdl.lsp.server import VkdServer

INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 100,
    "method": "initialize",
    "params": {"processId": None, "rootUri": None, "capabilities": {}},
}


def frame(message: Any) -> bytes:
    body = message if isinstance(message, bytes) else json.dumps(message).encode()
    return b"Content-Length: %d\r\n\r\n" % len(body) + body


def request(rid: int, method: str = "shutdown", params: Any = None) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": rid, "method": method, "params": params}


class Trickle(io.RawIOBase):
    """A stream that hands out one byte per read, as a slow pipe may."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.at = 0

    def readable(self) -> bool:
        return True

    def read1(self, n: int = -1) -> bytes:
        chunk = self.data[self.at : self.at + 1]
        self.at += len(chunk)
        return chunk


def frames(data: bytes | io.RawIOBase, **kw: Any) -> list[framing.Frame]:
    stream = io.BytesIO(data) if isinstance(data, bytes) else data
    reader = FrameReader(stream, **kw)  # type: ignore[arg-type]
    out = []
    while (got := reader.read()) is not None:
        out.append(got)
        assert len(out) < 1000, "the reader does not advance"
    return out


def messages(got: list[framing.Frame]) -> list[Any]:
    return [f.message for f in got if not f.code]


def errors(got: list[framing.Frame]) -> list[tuple[int, Any]]:
    return [(f.code, f.id) for f in got if f.code]


# ---- the reader, on byte streams ------------------------------------------------------------


def test_good_frames_in_any_header_style_are_read_in_order() -> None:
    one, two = request(1), request(2)
    body = json.dumps(two).encode()
    data = (
        frame(one)
        + b"\r\n"  # a stray blank line between messages
        + b"content-type: application/vscode-jsonrpc; charset=utf-8\n"
        + b"CONTENT-LENGTH:%d\n\n" % len(body)
        + body
    )
    got = frames(data)
    assert messages(got) == [one, two] and not errors(got)
    assert messages(frames(Trickle(data))) == [one, two]


@pytest.mark.parametrize("value", [b"abc", b"-5", b"", b"12abc", b"\xff\xfe"])
def test_non_numeric_content_length_is_a_parse_error_then_the_next_message(value: bytes) -> None:
    got = frames(b"Content-Length: " + value + b"\r\n\r\n" + b'{"x": 1}' + frame(request(2)))
    assert errors(got) == [(framing.PARSE_ERROR, None)]
    assert messages(got) == [request(2)]


@pytest.mark.parametrize("off", [1, 5, 17, 40])
def test_content_length_too_long_answers_that_request_and_keeps_the_next(off: int) -> None:
    body = json.dumps(request(7, "textDocument/hover")).encode()
    data = b"Content-Length: %d\r\n\r\n" % (len(body) + off) + body + frame(request(8))
    for stream in (data, Trickle(data)):
        got = frames(stream)
        assert errors(got) == [(framing.PARSE_ERROR, 7)]
        assert messages(got) == [request(8)]


@pytest.mark.parametrize("off", [1, 9, 30])
def test_content_length_too_short_answers_that_request_and_keeps_the_next(off: int) -> None:
    body = json.dumps(request(7, "textDocument/hover", {"a": [1, 2]})).encode()
    data = b"Content-Length: %d\r\n\r\n" % (len(body) - off) + body + frame(request(8))
    got = frames(data)
    assert errors(got) == [(framing.PARSE_ERROR, 7)]
    assert messages(got) == [request(8)]


def test_a_body_without_header_is_answered_and_the_next_message_read() -> None:
    data = json.dumps(request(3)).encode() + frame(request(4)) + b"\r\n" + frame(request(5))
    got = frames(data)
    assert errors(got) == [(framing.PARSE_ERROR, 3)]
    assert messages(got) == [request(4), request(5)]
    # a nested "id" is not taken for the request's
    nested = b'{"jsonrpc": "2.0", "params": {"id": 9}, "method": "x"}\n' + frame(request(4))
    assert errors(frames(nested)) == [(framing.PARSE_ERROR, None)]


@pytest.mark.parametrize("length", [b"99999999999", b"9" * 5000, b"1001"])
def test_a_message_over_the_limit_is_refused_without_reading_it(length: bytes) -> None:
    # 1001 bytes really sent, over a limit of 1000: skipped in chunks, not buffered whole
    body = b'{"pad": "' + b"x" * 990 + b'"}'
    data = b"Content-Length: " + length + b"\r\n\r\n" + body + frame(request(2))
    got = frames(data, limit=1000)
    assert errors(got) == [(framing.INVALID_REQUEST, None)]
    assert "over the limit" in next(f.error for f in got if f.code)
    assert messages(got) == [request(2)]


def test_a_header_line_without_end_and_a_body_that_is_no_json_are_parse_errors() -> None:
    long_line = b"X-Junk: " + b"a" * (framing.MAX_HEADER_BYTES + 10) + b"\r\n\r\n"
    many_lines = b"X-Junk: a\r\n" * (framing.MAX_HEADER_BYTES // 10)
    deep = b"[" * 100_000  # json.loads raises RecursionError, not ValueError
    data = (
        long_line
        + frame(request(1))
        + many_lines
        + frame(deep)
        + frame(b"\xff\xfe{}")
        + frame(request(2))
    )
    got = frames(data)
    assert [c for c, _ in errors(got)] == [framing.PARSE_ERROR] * 4
    assert messages(got) == [request(1), request(2)]


def test_a_message_cut_short_by_the_end_of_input_ends_the_stream() -> None:
    data = frame(request(1)) + b"Content-Length: 50\r\n\r\n{"
    assert messages(frames(data)) == [request(1)]


GOOD = frame(request(99))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.binary(max_size=300).filter(lambda b: b"content-length:" not in b.lower()),
    st.sampled_from([b"", b"\r\n", b"Content-Length: 3\r\n\r\n", GOOD[:10], b"\n" * 3]),
)
def test_any_garbage_then_a_good_message_leaves_the_reader_in_step(
    garbage: bytes, tail: bytes
) -> None:
    # Garbage with no Content-Length of its own, so nothing in it can claim the good message's
    # bytes: the reader never raises, advances, and reads the good message last.
    got = frames(garbage + tail + GOOD)
    assert got and got[-1].message == request(99) and not got[-1].code
    assert all(f.code in (0, framing.PARSE_ERROR, framing.INVALID_REQUEST) for f in got)


# ---- the server, in this process ------------------------------------------------------------


def serve(data: bytes) -> list[dict[str, Any]]:
    """Every message a fresh server writes for ``data`` on its stdin (then end of input)."""
    out = io.BytesIO()
    VkdServer().start_io(io.BytesIO(data), out)
    return list(_parse(out.getvalue()))


def _parse(data: bytes) -> Any:
    while data:
        head, sep, data = data.partition(b"\r\n\r\n")
        assert sep, f"no header end in {data[:80]!r}"
        length = int(
            next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")).split(
                b":"
            )[1]
        )
        yield json.loads(data[:length])
        data = data[length:]


def by_id(answers: list[dict[str, Any]]) -> dict[Any, dict[str, Any]]:
    return {a.get("id"): a for a in answers if "method" not in a}


def test_malformed_json_gets_a_parse_error_with_its_id_where_readable() -> None:
    cut = frame(b'{"jsonrpc": "2.0", "id": 1, "method": "shutdown", "params": {')
    answers = serve(frame(b"{not json") + cut + frame(INITIALIZE))
    got = by_id(answers)
    assert got[None]["error"]["code"] == got[1]["error"]["code"] == framing.PARSE_ERROR
    assert "capabilities" in got[100]["result"]


@pytest.mark.parametrize(
    ("message", "rid"),
    [
        ([request(1)], None),  # a batch: LSP has none
        ("hello", None),
        ({"jsonrpc": "1.0", "id": 5, "method": "shutdown"}, 5),
        ({"jsonrpc": "2.0", "id": 6, "method": 42}, 6),
        ({"jsonrpc": "2.0", "id": {"no": 1}, "method": "shutdown"}, None),
        ({"jsonrpc": "2.0", "id": True, "method": "shutdown"}, None),
        ({"jsonrpc": "2.0", "result": 3}, None),
    ],
)
def test_an_invalid_request_gets_invalid_request(message: Any, rid: Any) -> None:
    got = by_id(serve(frame(message) + frame(INITIALIZE)))
    assert got[rid]["error"]["code"] == framing.INVALID_REQUEST
    assert "capabilities" in got[100]["result"]


def test_a_request_with_wrong_parameter_types_gets_invalid_params() -> None:
    hover = request(
        2, "textDocument/hover", {"textDocument": {"uri": "file:///a.vkd"}, "position": "x"}
    )
    bad_init = request(3, "initialize", {"processId": "me", "capabilities": []})
    bad_open = {"jsonrpc": "2.0", "method": "textDocument/didOpen", "params": {"x": 1}}
    answers = serve(frame(hover) + frame(bad_init) + frame(bad_open) + frame(INITIALIZE))
    got = by_id(answers)
    for rid in (2, 3):
        assert got[rid]["error"]["code"] == framing.INVALID_PARAMS
    assert "$.params.position" in got[2]["error"]["message"]
    assert "capabilities" in got[100]["result"]
    # a notification has no answer: the user is told, as pygls does
    shown = [a for a in answers if a.get("method") == "window/showMessage"]
    assert len(shown) == 1 and set(got) == {2, 3, 100}


def test_every_request_gets_an_answer_after_shutdown_too() -> None:
    answers = serve(frame(INITIALIZE) + frame(request(1)) + frame(request(2, "textDocument/hover")))
    got = by_id(answers)
    assert got[1]["result"] is None  # the shutdown itself
    assert got[2]["error"]["code"] == framing.INVALID_REQUEST


# ---- the server as an editor starts it -------------------------------------------------------


def test_lsp_process_fed_hostile_bytes_still_answers_initialize_and_exits() -> None:
    hostile = (
        b"Content-Length: abc\r\n\r\n{}"
        + json.dumps(request(1)).encode()  # a body without a header
        + b"Content-Length: 99999999999\r\n\r\n{}"
        + b"Content-Length: 30\r\n\r\n"  # off by some bytes
        + json.dumps(request(2)).encode()
        + frame(request(3, "textDocument/hover", {"position": []}))
        + frame(b"{not json")
    )
    goodbye = frame(request(4)) + frame({"jsonrpc": "2.0", "method": "exit"})
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "vitkdl", "lsp"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    proc.stdin.write(hostile + frame(INITIALIZE) + goodbye)
    proc.stdin.flush()  # and left open: `exit` ends the server, not the end of its input
    try:
        returncode = proc.wait(timeout=60)
    finally:
        proc.kill()
        proc.stdin.close()
    elapsed = time.perf_counter() - started
    assert returncode == 0, proc.stderr.read().decode()[-2000:]
    answers = list(_parse(proc.stdout.read()))
    got = by_id(answers)
    assert "capabilities" in got[100]["result"]
    assert got[3]["error"]["code"] == framing.INVALID_PARAMS
    assert got[4] == {"jsonrpc": "2.0", "id": 4, "result": None}  # the shutdown
    codes = sorted(a["error"]["code"] for a in answers if "error" in a)
    assert framing.INVALID_REQUEST in codes and codes.count(framing.PARSE_ERROR) >= 3
    print(f"\nhostile stdin, initialize, shutdown, exit: {elapsed:.2f} s (process start included)")
