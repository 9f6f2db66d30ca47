"""``vitkdl lsp``: the language server (pygls, JSON-RPC over stdio).

- diagnostics: every open recipe is checked on open, save and change (debounced by
  ``VITKDL_LSP_DEBOUNCE`` seconds, 0.3 by default) with the code of ``vitkdl validate``, on the
  editor's unsaved text; a diagnostic in a base recipe or a teacher recipe is shown on the
  ``extends``/``teacher from`` path that leads to it;
- hover: models, taps, terms and fields (:func:`vitkdl.lsp.analysis.hover`);
- completion: :func:`vitkdl.lsp.complete.complete`;
- go to definition on ``extends`` and ``teacher from`` paths;
- formatting: ``vitkdl fmt``.

Checks run in one worker thread, so the server keeps reading messages while a cold model is
resolved (the first check of a new model imports torch; later ones read the facts cache).
Messages are read by :mod:`vitkdl.lsp.framing`, not by pygls: bad framing, a message over 64 MiB
and a malformed request get a JSON-RPC error, and the server reads on.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from lsprotocol import types
from pygls.io_ import StdoutWriter
from pygls.lsp.server import LanguageServer

from vitkdl import __version__
from vitkdl.errors import Diagnostic, Span
from vitkdl.lsp.analysis import Analysis, analyse, definition, hover, path_strings
from vitkdl.lsp.complete import Item, complete
from vitkdl.lsp.framing import Frame, FrameReader, dispatch

_CATEGORIES = {  # a completion's category as the protocol's item kind
    "keyword": types.CompletionItemKind.Keyword,
    "field": types.CompletionItemKind.Field,
    "choice": types.CompletionItemKind.EnumMember,
    "function": types.CompletionItemKind.Function,
    "model": types.CompletionItemKind.Class,
    "tap": types.CompletionItemKind.Property,
    "file": types.CompletionItemKind.File,
}


def uri_path(uri: str) -> Path:
    """The file a ``file://`` URI names (an untitled buffer: ``untitled.vkd`` here)."""
    parsed = urlparse(uri)
    if parsed.scheme != "file":
        return Path.cwd() / "untitled.vkd"
    return Path(unquote(parsed.path))


class _Text:
    """Conversions between the server's (1-based, characters) and the client's positions."""

    def __init__(self, text: str, encoding: str) -> None:
        self.lines = text.split("\n")
        self.encoding = encoding

    def _units(self, s: str) -> int:
        if self.encoding == types.PositionEncodingKind.Utf8:
            return len(s.encode("utf-8"))
        if self.encoding == types.PositionEncodingKind.Utf32:
            return len(s)
        return len(s.encode("utf-16-le")) // 2

    def position(self, line: int, column: int) -> types.Position:
        """A 1-based (line, column) in characters as a protocol position."""
        row = min(max(line - 1, 0), max(len(self.lines) - 1, 0))
        text = self.lines[row] if self.lines else ""
        return types.Position(row, self._units(text[: max(column - 1, 0)]))

    def range(self, span: Span) -> types.Range:
        return types.Range(
            self.position(span.line, span.column), self.position(span.end_line, span.end_column)
        )

    def column(self, position: types.Position) -> tuple[int, int]:
        """A protocol position as a 1-based (line, column) in characters."""
        text = self.lines[position.line] if position.line < len(self.lines) else ""
        units = 0
        for i, c in enumerate(text):
            if units >= position.character:
                return position.line + 1, i + 1
            units += self._units(c)
        return position.line + 1, len(text) + 1

    def offset(self, position: types.Position) -> int:
        line, column = self.column(position)
        return sum(len(x) + 1 for x in self.lines[: line - 1]) + column - 1

    def end(self) -> types.Position:
        return types.Position(len(self.lines) - 1, self._units(self.lines[-1]))


def _message(d: Diagnostic) -> str:
    parts = [d.message]
    if d.expected:
        parts.append(f"expected: {d.expected}")
    if d.hint:
        parts.append(f"help: {d.hint}")
    return "\n".join(parts)


def to_protocol(analysis: Analysis, encoding: str) -> list[types.Diagnostic]:
    """The analysis's diagnostics as protocol diagnostics for its document."""
    text = _Text(analysis.text, encoding)
    links = path_strings(analysis.text)
    elsewhere = types.Range(types.Position(0, 0), types.Position(0, 0))
    if links:
        start, end, _ = links[0]
        head = analysis.text[:start]
        line = head.count("\n") + 1
        column = start - (head.rfind("\n") + 1) + 1
        elsewhere = text.range(
            Span(file="", line=line, column=column, end_line=line, end_column=column + end - start)
        )
    out = []
    for d in analysis.diagnostics:
        severity = (
            types.DiagnosticSeverity.Error if d.is_error else types.DiagnosticSeverity.Warning
        )
        if analysis.here(d.span):
            assert d.span is not None
            out.append(types.Diagnostic(text.range(d.span), _message(d), severity, source="vitkdl"))
            continue
        where = f"{d.span}: " if d.span is not None else ""
        related = None
        if d.span is not None and Path(d.span.file).exists():
            target = Path(d.span.file).resolve()
            related = [
                types.DiagnosticRelatedInformation(
                    types.Location(
                        target.as_uri(),
                        types.Range(
                            types.Position(d.span.line - 1, d.span.column - 1),
                            types.Position(d.span.line - 1, d.span.column),
                        ),
                    ),
                    d.message,
                )
            ]
        out.append(
            types.Diagnostic(
                elsewhere,
                where + _message(d),
                severity,
                source="vitkdl",
                related_information=related,
            )
        )
    return out


def _raw_stdin() -> Any:
    """stdin unbuffered: the reader thread is a daemon, and one blocked in ``sys.stdin.buffer``
    holds its lock, which aborts the interpreter's exit ("could not acquire lock ... at
    interpreter shutdown, possibly due to daemon threads"); a raw read holds none."""
    try:
        return open(sys.stdin.fileno(), "rb", buffering=0, closefd=False)
    except (AttributeError, OSError, ValueError):  # no file descriptor (an embedding)
        return sys.stdin.buffer


class VkdServer(LanguageServer):
    """The vitkdl language server: one analysis per open document, checked off the loop."""

    def __init__(self) -> None:
        super().__init__(
            "vitkdl", __version__, text_document_sync_kind=types.TextDocumentSyncKind.Incremental
        )
        self.debounce = float(os.environ.get("VITKDL_LSP_DEBOUNCE", "0.3"))
        self.analyses: dict[str, Analysis] = {}
        self.pending: dict[str, asyncio.Task[None]] = {}
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vitkdl-check")

    def start_io(self, stdin: Any = None, stdout: Any = None) -> None:
        """Serve over stdio (``stdin``/``stdout``: binary streams) until exit or end of input.

        pygls's own loop, with :class:`vitkdl.lsp.framing.FrameReader` for its reader and
        :func:`vitkdl.lsp.framing.dispatch` for its ``json.loads`` and ``handle_message``.
        """
        self._stop_event = threading.Event()
        writer = StdoutWriter(stdout or sys.stdout.buffer)
        self.protocol.set_writer(writer)
        try:
            asyncio.run(self._serve(FrameReader(stdin or _raw_stdin()), writer))
        except BrokenPipeError:
            pass  # the client is gone
        except (KeyboardInterrupt, SystemExit):
            pass  # SystemExit: pygls's exit handler
        finally:
            self.shutdown()

    async def _serve(self, reader: FrameReader, writer: StdoutWriter) -> None:
        loop = asyncio.get_running_loop()
        frames: asyncio.Queue[Frame | None] = asyncio.Queue(maxsize=1)

        def pump() -> None:
            # A daemon thread: a read blocked on stdin does not keep the process alive after exit.
            while True:
                try:
                    frame = reader.read()
                except Exception:  # an unreadable stdin ends the session like its end
                    frame = None
                try:  # waits for the loop to take it: one message read ahead at most
                    asyncio.run_coroutine_threadsafe(frames.put(frame), loop).result()
                except RuntimeError:
                    return  # the loop is closed
                if frame is None:
                    return

        threading.Thread(target=pump, name="vitkdl-lsp-reader", daemon=True).start()
        assert self._stop_event is not None
        while not self._stop_event.is_set():
            frame = await frames.get()
            if frame is None:
                break
            dispatch(self, frame, writer)

    @property
    def encoding(self) -> str:
        return str(self.workspace.position_encoding or types.PositionEncodingKind.Utf16)

    def text(self, uri: str) -> str:
        return self.workspace.get_text_document(uri).source

    async def analysis(self, uri: str) -> Analysis:
        """The analysis of the document's current text (checked now when it is stale)."""
        text = self.text(uri)
        known = self.analyses.get(uri)
        if known is not None and known.text == text:
            return known
        loop = asyncio.get_running_loop()
        fresh = await loop.run_in_executor(self.worker, analyse, text, uri_path(uri))
        if self.text(uri) == text:
            self.analyses[uri] = fresh
        return fresh

    def schedule(self, uri: str, delay: float) -> None:
        """Check ``uri`` after ``delay`` seconds, replacing a check not yet started."""
        task = self.pending.pop(uri, None)
        if task is not None:
            task.cancel()
        self.pending[uri] = asyncio.get_running_loop().create_task(self._check(uri, delay))

    async def _check(self, uri: str, delay: float) -> None:
        await asyncio.sleep(delay)
        document = self.workspace.get_text_document(uri)
        version = document.version
        result = await self.analysis(uri)
        current = self.workspace.text_documents.get(uri)
        if current is None or current.version != version or result.text != current.source:
            return  # changed meanwhile: the newer check publishes
        self.text_document_publish_diagnostics(
            types.PublishDiagnosticsParams(
                uri=uri, diagnostics=to_protocol(result, self.encoding), version=version
            )
        )


server = VkdServer()


@server.feature(types.INITIALIZED)
def _initialized(ls: VkdServer, params: types.InitializedParams) -> None:
    # Paths in recipes (weights, data.root) are relative to the working directory, as on the
    # command line: the workspace root, like a terminal opened in the project.
    root = ls.workspace.root_path
    if root and Path(root).is_dir():
        os.chdir(root)


@server.feature(types.TEXT_DOCUMENT_DID_OPEN)
async def _did_open(ls: VkdServer, params: types.DidOpenTextDocumentParams) -> None:
    ls.schedule(params.text_document.uri, 0)


@server.feature(types.TEXT_DOCUMENT_DID_CHANGE)
async def _did_change(ls: VkdServer, params: types.DidChangeTextDocumentParams) -> None:
    ls.schedule(params.text_document.uri, ls.debounce)


@server.feature(types.TEXT_DOCUMENT_DID_SAVE)
async def _did_save(ls: VkdServer, params: types.DidSaveTextDocumentParams) -> None:
    for uri in list(ls.workspace.text_documents):  # a saved base changes its users
        ls.analyses.pop(uri, None)
        ls.schedule(uri, 0)


@server.feature(types.TEXT_DOCUMENT_DID_CLOSE)
async def _did_close(ls: VkdServer, params: types.DidCloseTextDocumentParams) -> None:
    uri = params.text_document.uri
    task = ls.pending.pop(uri, None)
    if task is not None:
        task.cancel()
    ls.analyses.pop(uri, None)
    ls.text_document_publish_diagnostics(types.PublishDiagnosticsParams(uri=uri, diagnostics=[]))


@server.feature(types.TEXT_DOCUMENT_HOVER)
async def _hover(ls: VkdServer, params: types.HoverParams) -> types.Hover | None:
    uri = params.text_document.uri
    result = await ls.analysis(uri)
    line, column = _Text(result.text, ls.encoding).column(params.position)
    text = hover(result, line, column)
    if text is None:
        return None
    return types.Hover(types.MarkupContent(types.MarkupKind.Markdown, text))


def _item(item: Item) -> types.CompletionItem:
    doc = (
        types.MarkupContent(types.MarkupKind.Markdown, item.documentation)
        if item.documentation
        else None
    )
    return types.CompletionItem(
        label=item.label,
        kind=_CATEGORIES.get(item.category),
        detail=item.detail or None,
        documentation=doc,
    )


@server.feature(
    types.TEXT_DOCUMENT_COMPLETION, types.CompletionOptions(trigger_characters=[".", '"', "/", "("])
)
async def _completion(ls: VkdServer, params: types.CompletionParams) -> types.CompletionList:
    uri = params.text_document.uri
    text = ls.text(uri)
    offset = _Text(text, ls.encoding).offset(params.position)
    loop = asyncio.get_running_loop()
    items, more = await loop.run_in_executor(ls.worker, complete, text, offset, uri_path(uri))
    return types.CompletionList(is_incomplete=more, items=[_item(i) for i in items])


@server.feature(types.TEXT_DOCUMENT_DEFINITION)
def _definition(ls: VkdServer, params: types.DefinitionParams) -> types.Location | None:
    uri = params.text_document.uri
    text = ls.text(uri)
    target = definition(text, _Text(text, ls.encoding).offset(params.position), uri_path(uri))
    if target is None:
        return None
    start = types.Position(0, 0)
    return types.Location(target.resolve().as_uri(), types.Range(start, start))


@server.feature(types.TEXT_DOCUMENT_FORMATTING)
def _formatting(ls: VkdServer, params: types.DocumentFormattingParams) -> list[Any] | None:
    from vitkdl.errors import VkdError
    from vitkdl.fmt import format_text

    text = ls.text(params.text_document.uri)
    try:
        new = format_text(text)
    except VkdError:
        return None  # the diagnostics already show the syntax errors
    if new == text:
        return []
    whole = types.Range(types.Position(0, 0), _Text(text, ls.encoding).end())
    return [types.TextEdit(whole, new)]


def serve() -> None:
    """Serve over stdio until the client says exit."""
    server.start_io()
