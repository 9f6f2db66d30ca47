"""CLI tests: :func:`run` calls ``vitkdl`` in-process and returns its exit status and output."""

from __future__ import annotations


def run(capsys, *argv: str) -> tuple[int, str, str]:
    """``vitkdl ARGV...`` in this process: (exit status, stdout, stderr)."""
    from vitkdl.cli import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err
