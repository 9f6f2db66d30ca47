"""The ``vitkdl`` command: one module per subcommand (validate, explain, run, cache, bench,
fmt, docs, init, ls, cp, lsp)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from vitkdl import __version__
from vitkdl.exits import INTERNAL, INTERRUPTED, USAGE, exit_of

EPILOG = """examples:
  vitkdl validate recipes/*.vkd                       check every recipe, report all errors
  vitkdl explain recipes/deit_base_vitkd_kd.vkd       the resolved plan: models, terms, cost
  vitkdl explain recipes/quickstart.vkd --json        the same as JSON
  vitkdl explain recipes/deit_tiny_vitkd_kd.vkd --set distill.generate.mask=0.75
  vitkdl fmt --check recipes                          is every recipe in the canonical layout?
  vitkdl docs                                         regenerate docs/language.md (the reference)
  vitkdl init --teacher vit_base_patch16_224 --student vit_small_patch16_224 -o my.vkd
  vitkdl ls                                           the shipped recipes; vitkdl cp NAME DEST

Overrides (--set PATH=VALUE) use the recipe's own value syntax: train.epochs=1,
data.root=/data/imagenet, student.drop_path=0, train.optimizer.lr=5e-4,
distill.generate.weight=3e-6 (terms by name).
"""


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line and exits 2 (no traceback)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(USAGE)


def build_parser() -> argparse.ArgumentParser:
    from vitkdl.cli import bench, cache, cp, docs, explain, fmt, init, ls, lsp, run, validate

    parser = _Parser(
        prog="vitkdl",
        description="Declarative ViTKD knowledge distillation "
        "for Vision Transformers (timm + torch.compile).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"vitkdl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for module in (validate, explain, run, cache, bench, fmt, docs, init, ls, cp, lsp):
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vitkdl`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return USAGE
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return INTERRUPTED
    except Exception as exc:  # the last line of defence: one line, never a traceback
        ended = exit_of(exc)
        if ended.status != INTERNAL:  # a file that cannot be written (disk full, read-only)
            sys.stderr.write(f"vitkdl: error: {ended.message}\n")
            return ended.status
        if os.environ.get("VITKDL_DEBUG"):
            raise
        sys.stderr.write(
            f"vitkdl: internal error: {ended.message}\n"
            "  (set VITKDL_DEBUG=1 for the traceback, and please report it)\n"
        )
        return INTERNAL
