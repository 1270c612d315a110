"""The application layer: the ``squint`` command, the local stack, packs written for demos and tests,
and the client helpers. It sees every part; nothing below it imports it (``pyproject.toml``'s
import-linter contracts check that)."""
