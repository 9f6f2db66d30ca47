"""A minimal Language Server Protocol client: JSON-RPC with Content-Length framing over the
stdio of a ``python -m vitkdl lsp`` subprocess, as an editor speaks it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.conftest import ROOT


class LspError(Exception):
    """The server answered a request with an error."""


class Client:
    """Start the server, send requests and notifications, wait for replies."""

    def __init__(self, cwd: Path, env: dict[str, str] | None = None) -> None:
        self.stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed in close()
        environment = {**os.environ, **(env or {})}
        environment["PYTHONPATH"] = os.pathsep.join(
            [str(ROOT), *filter(None, [environment.get("PYTHONPATH")])]
        )
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vitkdl", "lsp"],
            cwd=cwd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            env=environment,
        )
        self.next_id = 0
        self.replies: dict[int, dict[str, Any]] = {}
        self.notifications: list[dict[str, Any]] = []
        self.cond = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    # ---- wire --------------------------------------------------------------------------------

    def _send(self, message: dict[str, Any]) -> None:
        body = json.dumps({"jsonrpc": "2.0", **message}).encode()
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"Content-Length: %d\r\n\r\n" % len(body) + body)
        self.proc.stdin.flush()

    def _read(self) -> None:
        stream = self.proc.stdout
        assert stream is not None
        while True:
            headers: dict[str, str] = {}
            while True:
                line = stream.readline()
                if not line:
                    return
                line = line.strip()
                if not line:
                    break
                key, _, value = line.decode().partition(":")
                headers[key.strip().lower()] = value.strip()
            body = stream.read(int(headers["content-length"]))
            message = json.loads(body)
            with self.cond:
                if "id" in message and "method" not in message:
                    self.replies[message["id"]] = message
                elif "id" in message:  # a request from the server: answer it with nothing
                    self._send({"id": message["id"], "result": None})
                else:
                    self.notifications.append(message)
                self.cond.notify_all()

    def _wait(self, ready: Callable[[], Any], timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                got = ready()
                if got is not None:
                    return got
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise TimeoutError(
                        f"no {what} within {timeout} s; server stderr:\n{self.server_stderr()}"
                    )
                self.cond.wait(min(left, 0.5))

    # ---- API -----------------------------------------------------------------------------

    def request(self, method: str, params: Any, timeout: float = 60) -> Any:
        self.next_id += 1
        rid = self.next_id
        self._send({"id": rid, "method": method, "params": params})
        reply = self._wait(lambda: self.replies.pop(rid, None), timeout, f"reply to {method}")
        if "error" in reply:
            raise LspError(reply["error"])
        return reply.get("result")

    def notify(self, method: str, params: Any) -> None:
        self._send({"method": method, "params": params})

    def diagnostics(
        self, uri: str, version: int | None = None, timeout: float = 120
    ) -> list[dict[str, Any]]:
        """The next diagnostics published for ``uri`` (for ``version`` when given); consumed."""

        def ready() -> list[dict[str, Any]] | None:
            for i, n in enumerate(self.notifications):
                p = n.get("params", {})
                if (
                    n.get("method") == "textDocument/publishDiagnostics"
                    and p.get("uri") == uri
                    and (version is None or p.get("version") == version)
                ):
                    del self.notifications[: i + 1]
                    return p["diagnostics"]
            return None

        return self._wait(ready, timeout, f"diagnostics for {uri}")

    def initialize(self, root: Path) -> dict[str, Any]:
        result = self.request(
            "initialize",
            {
                "processId": os.getpid(),
                "rootUri": root.as_uri(),
                "capabilities": {"textDocument": {"hover": {"contentFormat": ["markdown"]}}},
            },
        )
        self.notify("initialized", {})
        return result

    def open(self, path: Path, text: str, version: int = 1) -> str:
        uri = path.as_uri()
        self.notify(
            "textDocument/didOpen",
            {"textDocument": {"uri": uri, "languageId": "vkd", "version": version, "text": text}},
        )
        return uri

    def change(self, uri: str, text: str, version: int) -> None:
        self.notify(
            "textDocument/didChange",
            {"textDocument": {"uri": uri, "version": version}, "contentChanges": [{"text": text}]},
        )

    def at(self, uri: str, line: int, character: int) -> dict[str, Any]:
        return {"textDocument": {"uri": uri}, "position": {"line": line, "character": character}}

    def server_stderr(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read().decode(errors="replace")[-4000:]

    def close(self) -> int:
        try:
            self.request("shutdown", None, timeout=10)
            self.notify("exit", None)
            assert self.proc.stdin is not None
            self.proc.stdin.close()  # as an editor does when it is done with the server
            return self.proc.wait(timeout=10)
        except (TimeoutError, BrokenPipeError, OSError):
            self.proc.kill()
            return self.proc.wait()
        finally:
            self.stderr.close()
