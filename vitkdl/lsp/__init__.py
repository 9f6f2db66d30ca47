"""The vitkdl language server (``vitkdl lsp``): :mod:`.analysis` (checks, hover, definition)
and :mod:`.complete` need no pygls; :mod:`.server` speaks the protocol with pygls."""
