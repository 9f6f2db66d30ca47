"""``python -m vitkdl`` is the ``vitkdl`` command."""

from vitkdl.cli import main

raise SystemExit(main())
