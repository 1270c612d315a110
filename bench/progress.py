"""A one-line progress bar on stderr: ``[#######.............]  7/20  1m04s  none cold 2/3``.

On a terminal it redraws in place; elsewhere (a log, CI) it writes a line per step while the
total is small, else one per percent, so thousands of steps do not flood the log."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """Counts steps towards ``total``; redraws in place on a terminal, one line per step otherwise."""

    def __init__(self, total: int, stream: TextIO | None = None, width: int = 28, clock=time.monotonic) -> None:
        self.total = max(total, 1)
        self.done = 0
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self._clock = clock
        self._started = clock()
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last_percent = -1

    def line(self, label: str) -> str:
        filled = min(self.width, self.width * self.done // self.total)
        elapsed = int(self._clock() - self._started)
        return (
            f"[{'#' * filled}{'.' * (self.width - filled)}] {self.done:>{len(str(self.total))}}/{self.total} "
            f"{elapsed // 60}m{elapsed % 60:02d}s  {label}"
        )

    def show(self, label: str) -> None:
        """Draw the bar with ``label`` (what runs now) without counting a step."""
        if self._tty:
            self.stream.write("\r\x1b[2K" + self.line(label))
        else:
            self.stream.write(self.line(label) + "\n")
        self.stream.flush()

    def step(self, label: str = "") -> None:
        """One step is done; ``label`` says what comes next."""
        self.done = min(self.done + 1, self.total)
        percent = 100 * self.done // self.total
        if self._tty or self.total <= 100 or percent != self._last_percent:
            self._last_percent = percent
            self.show(label)

    def note(self, message: str) -> None:
        """A line of its own (the bar is redrawn after it on a terminal)."""
        if self._tty:
            self.stream.write("\r\x1b[2K")
        self.stream.write(message + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self._tty:
            self.stream.write("\n")
            self.stream.flush()
