"""The build cache and compiler runs every target shares.

Builds are cached by content: each target keys an entry by every source's text, the flags and
the compiler's version, builds it in a work folder and renames it into place, so a half-built
entry is never visible. A compiler failure carries the exact command and the compiler's output.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from .errors import BuildError, TargetUnavailable

# Warnings the generated C must compile cleanly under, on every compiler and core.
STRICT_WARNINGS = (
    "-Wall", "-Wextra", "-Wpedantic", "-Wconversion", "-Wdouble-promotion", "-Wshadow",
    "-Wcast-qual", "-Wstrict-prototypes", "-Werror",
)


def cache_root() -> Path:
    """Return the build cache folder ($GNCODEGEN_CACHE or ~/.cache/gncodegen)."""
    env = os.environ.get("GNCODEGEN_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "gncodegen"


# A work folder untouched this long belongs to a run that was killed: no build takes an hour.
STALE_WORK_SECONDS = 3600


def sweep_stale_work(parent: Path, now: float | None = None) -> None:
    """Remove work folders (`.<entry>.<random>`) that killed builds left in a cache folder."""
    now = time.time() if now is None else now
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return
    for entry in entries:
        if not (entry.name.startswith(".") and entry.name.count(".") >= 2):
            continue
        try:
            stale = entry.is_dir(follow_symlinks=False) and \
                now - entry.stat(follow_symlinks=False).st_mtime > STALE_WORK_SECONDS
        except OSError:
            continue
        if stale:
            shutil.rmtree(entry.path, ignore_errors=True)


@contextlib.contextmanager
def staged_entry(folder: Path, done: str):
    """Build a cache entry in a work folder beside `folder`, then rename it into place.

    Yields the work folder. On success it becomes `folder` atomically, so a half-built entry is
    never visible; losing that race to another process is fine once the winner's `done` file
    exists. The work folder is removed whatever happens, and stale ones of killed runs first.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_work(folder.parent)
    work = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        yield work
        try:
            os.rename(work, folder)
        except OSError:
            if not (folder / done).is_file():
                raise
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)


@functools.lru_cache(maxsize=None)
def compiler_version(cc: str) -> str:
    """Return the first line of `cc --version`, or raise TargetUnavailable if cc is missing."""
    if shutil.which(cc) is None:
        raise TargetUnavailable(f"compiler '{cc}' not found on PATH")
    out = subprocess.run([cc, "--version"], capture_output=True, text=True, check=False)
    return out.stdout.splitlines()[0] if out.stdout else cc


def run_compiler(what: str, command: list[str], cwd: Path | None = None) -> str:
    """Run a compiler command; return its output or raise BuildError with command and output."""
    proc = subprocess.run(command, capture_output=True, text=True, cwd=cwd, check=False)
    if proc.returncode != 0:
        raise BuildError(what, command, proc.stdout + proc.stderr)
    return proc.stdout + proc.stderr


def content_key(parts) -> str:
    """Return a short hash of parts (strings, or anything str() spells), in order."""
    h = hashlib.sha256()
    for part in parts:
        h.update(str(part).encode())
        h.update(b"\0")
    return h.hexdigest()[:24]


def write_sources(folder: Path, sources) -> None:
    """Write each Source into folder under its name."""
    for src in sources:
        (folder / src.name).write_text(src.text)


# The cache keeps at most this many bytes ($GNCODEGEN_CACHE_MAX: a number of bytes, or with a
# K, M or G suffix); past it, the entries built longest ago are removed after a command's run
# (built, not used: an entry is not touched when it is read).
DEFAULT_CACHE_MAX = 2 << 30
# An entry younger than this is never pruned to the cap (only by `gncodegen cache clean`).
FRESH_SECONDS = 600


def parse_bytes(text: str) -> int:
    """Return a size written as 123, 300M or 2G in bytes; raise ValueError otherwise."""
    text = text.strip().upper().removesuffix("B")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    number = text[:-1] if scale > 1 else text
    if not number.isdigit():
        raise ValueError(text)
    return int(number) * scale


def cache_limit() -> int:
    """Return the cache's size cap in bytes ($GNCODEGEN_CACHE_MAX, else DEFAULT_CACHE_MAX)."""
    env = os.environ.get("GNCODEGEN_CACHE_MAX")
    if not env:
        return DEFAULT_CACHE_MAX
    try:
        return parse_bytes(env)
    except ValueError:
        raise TargetUnavailable(f"GNCODEGEN_CACHE_MAX: '{env}' is not a size (e.g. 2G, 500M)")


# Cache folders whose every child is an entry of its own (the firmware images, the strict
# compile stamps, the footprint measurements); the others are entries themselves.
NESTED_CACHES = ("firmware", "strict", "footprint")


def _finished(parent: str) -> list[os.DirEntry]:
    """Return the finished entries in a folder: not the `.name.random` work folders of builds
    in progress, nor the cache's own dot files."""
    try:
        return [e for e in os.scandir(parent) if not e.name.startswith(".")]
    except OSError:
        return []


def cache_entries(root: Path | None = None) -> list[tuple[Path, int, float]]:
    """Return (path, bytes, when built) of every finished entry in the cache, oldest first."""
    root = cache_root() if root is None else root
    candidates = []
    for entry in _finished(str(root)):
        if entry.name in NESTED_CACHES and entry.is_dir(follow_symlinks=False):
            candidates += _finished(entry.path)
        elif entry.is_dir(follow_symlinks=False):
            candidates.append(entry)
    out = []
    for entry in candidates:
        try:
            when = entry.stat(follow_symlinks=False).st_mtime
            if not entry.is_dir(follow_symlinks=False):
                out.append((Path(entry.path), entry.stat(follow_symlinks=False).st_size, when))
                continue
        except OSError:
            continue
        size = 0
        for folder, _, names in os.walk(entry.path):
            for name in names:
                try:
                    size += os.lstat(os.path.join(folder, name)).st_size
                except OSError:
                    pass
        out.append((Path(entry.path), size, when))
    return sorted(out, key=lambda e: e[2])


def prune_cache(limit: int | None = None, root: Path | None = None) -> tuple[int, int]:
    """Remove the entries built longest ago until the cache holds at most limit bytes (all of
    them for limit 0); return (entries removed, bytes freed)."""
    limit = cache_limit() if limit is None else limit
    entries = cache_entries(root)
    total = sum(size for _, size, _ in entries)
    removed = freed = 0
    now = time.time()
    for folder, size, when in entries:
        if total <= limit:
            break
        if limit and now - when < FRESH_SECONDS:
            continue            # just built: another process may be about to use it
        if folder.is_dir() and not folder.is_symlink():
            shutil.rmtree(folder, ignore_errors=True)
        else:
            folder.unlink(missing_ok=True)
        total -= size
        removed += 1
        freed += size
    return removed, freed


# How often a command's run looks at the cache's size (a stamp file in the cache records when).
PRUNE_EVERY_SECONDS = 600
PRUNE_STAMP = ".pruned"


def prune_cache_now_and_then() -> None:
    """Prune the cache to its cap unless that was done in the last PRUNE_EVERY_SECONDS."""
    root = cache_root()
    stamp = root / PRUNE_STAMP
    try:
        if time.time() - stamp.stat().st_mtime < PRUNE_EVERY_SECONDS:
            return
    except FileNotFoundError:
        pass
    if not root.is_dir():
        return
    stamp.touch()
    prune_cache(root=root)
