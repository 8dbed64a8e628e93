"""Progress lines on long steps (compiling, emulating, QEMU), on stderr when it is a terminal:
a pipe or a log file gets only the results."""

from __future__ import annotations

import sys


def say(message: str) -> None:
    """Print `message...` on stderr when stderr is a terminal."""
    stream = sys.stderr
    if stream is not None and stream.isatty():
        print(f"{message}...", file=stream, flush=True)
