"""``vitkdl lsp``: the language server, over stdio (needs the ``lsp`` extra: pygls)."""

from __future__ import annotations

import argparse
import sys

HELP = """Run the vitkdl language server on standard input and output, for an editor to start
(the VS Code extension under editors/vscode/ does). It checks open recipes as you type (the
checks of `vitkdl validate`, on the unsaved text), shows what a model, tap, term or field
resolves to on hover, completes keywords, fields, choices, tap points and timm model names,
jumps to `extends` and `teacher from` recipes and formats with `vitkdl fmt`. Needs pygls:
pip install -e ".[lsp]"."""

EPILOG = """example (an editor's server command):
  vitkdl lsp

environment:
  VITKDL_LSP_DEBOUNCE   seconds to wait after a keystroke before checking (default 0.3)"""

INSTALL = 'pip install -e ".[lsp]"'


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "lsp",
        help="run the language server (stdio)",
        description=HELP,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        from vitkdl.lsp.server import serve
    except ImportError as exc:  # pygls missing, or a pygls 1.x without pygls.lsp.server
        missing = getattr(exc, "name", None) or "pygls"
        sys.stderr.write(
            f"vitkdl lsp: the language server needs pygls 2 ({missing} is not "
            f"importable): {INSTALL}\n"
        )
        return 2
    serve()
    return 0
