"""Writing an output folder: replaced whole and atomically, and only when gncodegen owns it.

A folder is ours when it holds nothing but regular files, one of them a gncodegen
`manifest.json`, and every other file is listed there with the sha256 of its bytes: a file a
user edited, added or put in the place of ours (a folder named `layer.c`, a symbolic link) makes
it theirs, and it is never replaced.

Every path is decided on the folder the output path resolves to (symbolic links followed,
`..` taken after the parents that do not exist yet are created), and decided again on what the
swap actually displaced: the new folder is exchanged with the old one in one atomic rename, the
displaced folder checked, and exchanged back untouched when it turns out not to be ours (another
process may have put something there in the meantime). Only the files found to be ours are then
removed, one by one; anything else makes the removal stop and leaves it where it is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import SpecError

MANIFEST = "manifest.json"
# A manifest larger than this was not written by gncodegen (it lists file hashes).
MANIFEST_MAX_BYTES = 1 << 20
NAME_MAX = 255
PATH_MAX = 4096
# mkdtemp adds this many random characters to a prefix.
RANDOM_CHARS = 8
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2


class _Displaced(SpecError):
    """A folder that is not ours was swapped out and could not be swapped back."""


def _refuse(rule: str) -> SpecError:
    return SpecError("output", rule)


def resolve_output(path: str | os.PathLike) -> Path:
    """Return the absolute folder an output path names once its parents exist.

    Raises SpecError when it cannot be one: the root, an existing file, a symbolic link to
    nothing, a path through a file, a name too long for the filesystem.
    """
    text = os.fspath(path)
    if not text:
        raise _refuse("the folder name is empty")
    if "\x00" in text:
        raise _refuse("the folder name holds a NUL character")
    raw = os.fsencode(text)
    if len(raw) > PATH_MAX:
        raise _refuse(f"the path is longer than {PATH_MAX} bytes")
    if any(len(part) > NAME_MAX for part in raw.split(b"/")):
        raise _refuse(f"a folder name in the path is longer than {NAME_MAX} bytes")
    try:
        return _resolve(text)
    except OSError as exc:
        raise _refuse(f"cannot use {text}: {exc.strerror or exc}") from None


def _resolve(text: str) -> Path:
    given = Path(text)
    if given.is_symlink() and not given.exists():
        raise _refuse(f"{text} is a symbolic link to {os.readlink(given)}, which does not "
                      "exist; remove the link or name its target")
    final = Path(os.path.realpath(given))
    if final == Path(final.anchor):
        raise _refuse(f"{text} is the root folder; name a folder for the generated files")
    if len(os.fsencode(final.name)) > NAME_MAX:
        raise _refuse(f"the folder name is longer than {NAME_MAX} bytes")
    if final.exists() and not final.is_dir():
        raise _refuse(f"{text} exists and is not a folder")
    if final.is_dir() and os.path.ismount(final):
        raise _refuse(f"{text} is a mount point, which cannot be replaced whole; name a folder "
                      "inside it")
    for parent in final.parents:
        if parent.exists():
            if not parent.is_dir():
                raise _refuse(f"{text}: {parent} is not a folder")
            break
    return final


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def owned_files(folder: Path) -> list[str] | None:
    """Return the names of the files in folder when gncodegen owns it (module docstring), else None.

    An empty folder is ours with no files; anything that is not a folder is not.
    """
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return None
    if not entries:
        return []
    if any(not e.is_file(follow_symlinks=False) for e in entries):
        return None
    names = {e.name: e for e in entries}
    manifest = names.get(MANIFEST)
    try:
        if manifest is None or manifest.stat(follow_symlinks=False).st_size > MANIFEST_MAX_BYTES:
            return None
        doc = json.loads(Path(manifest.path).read_bytes())
        listed = doc["files"]
        if not (isinstance(listed, dict) and str(doc.get("generator", "")).startswith("gncodegen")):
            return None
        for name, entry in names.items():
            if name != MANIFEST and (name not in listed or
                                     _file_sha256(entry.path) != listed[name]):
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return sorted(names)


def check_output(path: str | os.PathLike) -> Path:
    """Return the resolved output folder; raise SpecError when it is there and not ours.

    The early check, before any work: write_output decides again on what it replaces.
    """
    final = resolve_output(path)
    if final.is_dir() and owned_files(final) is None:
        raise _refuse(f"{os.fspath(path)} holds files gncodegen did not write (or that were "
                      "changed since); choose an empty or new folder")
    return final


def _hidden(name: str, tag: str) -> str:
    """Return the hidden sibling name `.<name>.<tag>`, shortened to fit the filesystem."""
    full = f".{name}.{tag}"
    if len(os.fsencode(full)) + RANDOM_CHARS <= NAME_MAX:
        return full
    digest = hashlib.sha256(os.fsencode(name)).hexdigest()[:16]
    return f".gncodegen-{digest}.{tag}"


def old_path(final: Path) -> Path:
    """Return where the fallback without an atomic exchange parks the previous output."""
    return final.with_name(_hidden(final.name, "old"))


@functools.lru_cache(maxsize=1)
def _renameat2():
    name = ctypes.util.find_library("c")
    if not name:
        return None
    libc = ctypes.CDLL(name, use_errno=True)
    return getattr(libc, "renameat2", None)


def _rename2(a: Path, b: Path, flags: int) -> bool:
    """Rename a to b with renameat2 flags; False where the call or the flag is unsupported.

    Any other failure raises OSError.
    """
    call = _renameat2()
    if call is None:
        return False
    rc = call(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), flags)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (RENAME_EXCHANGE); False where unsupported."""
    return _rename2(a, b, _RENAME_EXCHANGE)


def _rename_new(stage: Path, final: Path) -> bool:
    """Move stage to final when final does not exist; False when it does (or may).

    RENAME_NOREPLACE where the system has it; elsewhere a plain rename, which replaces only an
    empty folder.
    """
    try:
        if _rename2(stage, final, _RENAME_NOREPLACE):
            return True
        os.rename(stage, final)
        return True
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            return False
        raise


def _write_file(path: Path, text: str) -> None:
    """Write one staged file and flush it to the disk."""
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def _remove_owned(folder: Path, names: list[str]) -> bool:
    """Remove the named files of folder, then folder; False (and the rest kept) when something
    else is in it by then."""
    for name in names:
        try:
            os.unlink(folder / name)
        except FileNotFoundError:
            pass
    try:
        os.rmdir(folder)
    except OSError:
        return False
    return True


def restore_interrupted(final: Path) -> None:
    """Put back an output that a fallback run (no atomic exchange) left aside when killed."""
    old = old_path(final)
    if old.is_dir() and not old.is_symlink() and not os.path.lexists(final):
        os.rename(old, final)


def _discard_old(final: Path) -> None:
    """Remove a previous output that a fallback run killed before its clean-up left aside."""
    old = old_path(final)
    if old.is_dir() and not old.is_symlink():
        names = owned_files(old)
        if names is not None:
            _remove_owned(old, names)


def write_output(out_dir: str | os.PathLike, files: dict[str, str], manifest: str) -> Path:
    """Write files and manifest.json into out_dir, replacing it whole and atomically.

    Returns the folder written (out_dir resolved). Raises SpecError, leaving every existing
    file as it was, when out_dir is not ours or cannot be written.
    """
    shown = os.fspath(out_dir)
    final = resolve_output(out_dir)
    try:
        restore_interrupted(final)
        check_output(out_dir)
        final.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=_hidden(final.name, ""), dir=final.parent))
    except OSError as exc:
        raise _refuse(f"cannot write {shown}: {exc.strerror or exc}") from None
    placed = keep = False
    try:
        for name, text in {**files, MANIFEST: manifest}.items():
            _write_file(stage / name, text)
        placed = _rename_new(stage, final) or _replace(stage, final, shown)
    except _Displaced:
        keep = True                      # the stage holds the displaced folder now
        raise
    except OSError as exc:
        raise _refuse(f"cannot write {shown}: {exc.strerror or exc}") from None
    finally:
        if not (placed or keep) and stage.is_dir():
            shutil.rmtree(stage, ignore_errors=True)    # still only our staged files
    _discard_old(final)
    return final


def _replace(stage: Path, final: Path, shown: str) -> bool:
    """Swap the staged folder in for an existing final, which must turn out to be ours.

    Returns True once the new output is in place (stage is then gone, or left holding only
    what appeared in it meanwhile); raises SpecError with the old folder back where it was.
    """
    changed = _refuse(f"{shown} changed while gncodegen was writing it and now holds files it "
                      "did not write; left as it was")
    if _exchange(stage, final):
        names = owned_files(stage)       # what the swap displaced
        if names is None:
            try:
                _exchange(stage, final)  # not ours after all: put it back untouched
            except OSError as exc:
                raise _Displaced("output", f"{shown} changed while gncodegen was writing it; "
                                 f"its contents are now in {stage} ({exc.strerror})") from None
            raise changed
        _remove_owned(stage, names)
        return True
    # No atomic exchange on this filesystem or system: a short window without final, which
    # the next run repairs from old_path (restore_interrupted).
    old = old_path(final)
    os.rename(final, old)
    names = owned_files(old)
    if names is None:
        os.rename(old, final)
        raise changed
    os.rename(stage, final)
    _remove_owned(old, names)
    return True
