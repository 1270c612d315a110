"""The process environment for a while: what tritonserver and the servers a bench starts inherit."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping


@contextlib.contextmanager
def environ(updates: Mapping[str, str]) -> Iterator[None]:
    """``updates`` in this process's environment (which tritonserver inherits), then restored."""
    saved = {key: os.environ.get(key) for key in updates}
    os.environ.update(updates)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
