"""Opening the files a spec names: regular files only, checked before a byte is read.

A FIFO or a device given as a spec or parameter file would block or never end (`/dev/zero`),
so every file is opened without blocking and checked with fstat on the descriptor it will be
read through; a FIFO is refused from os.stat before it is opened at all.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import BinaryIO

from .errors import SpecError
from .text import preview

# Longest file name component and path Linux accepts.
NAME_MAX = 255
PATH_MAX = 4096

_REASONS = {
    errno.ENOENT: "file not found",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.ENAMETOOLONG: "the file name is too long",
    errno.ELOOP: "too many levels of symbolic links",
    errno.ENOTDIR: "a folder in the path is a file",
    errno.EISDIR: "it is a folder, not a file",
}


def os_reason(exc: OSError) -> str:
    """Return an OSError as the few words a one-line message needs."""
    return _REASONS.get(exc.errno, exc.strerror or type(exc).__name__)


def check_path_text(text: str, fld: str) -> None:
    """Raise unless text can be a path on this system (no NUL, components not too long)."""
    if "\x00" in text:
        raise SpecError(fld, "file name holds a NUL character")
    raw = os.fsencode(text) if text.isascii() else text.encode("utf-8", "surrogateescape")
    if len(raw) > PATH_MAX:
        raise SpecError(fld, f"the path is longer than {PATH_MAX} bytes")
    for part in raw.split(b"/"):
        if len(part) > NAME_MAX:
            raise SpecError(fld, f"a name in the path is longer than {NAME_MAX} bytes "
                                 f"({preview(os.fsdecode(part), 30)})")


def open_regular(path: Path, fld: str, shown: str, max_bytes: int | None = None) -> BinaryIO:
    """Return path opened for reading; raise SpecError unless it is a regular file.

    shown is how the message names the file. With max_bytes, a larger file is refused.
    """
    try:
        before = os.stat(path)
    except OSError as exc:
        raise SpecError(fld, f"{os_reason(exc)}: {preview(shown, 80)}") from None
    _check_kind(before, fld, shown, max_bytes)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise SpecError(fld, f"cannot open {preview(shown, 80)}: {os_reason(exc)}") from None
    try:
        _check_kind(os.fstat(fd), fld, shown, max_bytes)   # what was opened, not what was named
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _check_kind(st: os.stat_result, fld: str, shown: str, max_bytes: int | None) -> None:
    if not stat.S_ISREG(st.st_mode):
        kind = ("a folder" if stat.S_ISDIR(st.st_mode) else
                "a FIFO" if stat.S_ISFIFO(st.st_mode) else
                "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else
                "a socket" if stat.S_ISSOCK(st.st_mode) else "not a file")
        raise SpecError(fld, f"not a regular file: {preview(shown, 80)} is {kind}")
    if max_bytes is not None and st.st_size > max_bytes:
        raise SpecError(fld, f"{preview(shown, 80)} is {st.st_size} bytes, more than the "
                             f"limit of {max_bytes} ({max_bytes >> 20} MiB)")


def read_regular(path: Path, fld: str, shown: str, max_bytes: int) -> bytes:
    """Return the bytes of a regular file of at most max_bytes; raise SpecError otherwise."""
    with open_regular(path, fld, shown, max_bytes) as fh:
        try:
            data = fh.read(max_bytes + 1)
        except OSError as exc:
            raise SpecError(fld, f"cannot read {preview(shown, 80)}: {os_reason(exc)}"
                            ) from None
    if len(data) > max_bytes:       # it grew after the check
        raise SpecError(fld, f"{preview(shown, 80)} is more than the limit of {max_bytes} "
                             f"bytes ({max_bytes >> 20} MiB)")
    return data
