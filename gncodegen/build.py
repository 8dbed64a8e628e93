"""Building generated C into a Python module with cffi (API mode), through a content cache.

The generated sources are compiled by us with the strict flags (so a warning is an error and
the failure carries the exact command and the compiler's output); only cffi's own wrapper is
compiled with ordinary flags. The cache key is every source's text, the flags, the compiler's
version and the Python ABI, so a cached module is reused only when nothing that shaped it changed.
"""

from __future__ import annotations

import contextlib
import functools
import io
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import cffi

from . import __version__
from .errors import BuildError, TargetUnavailable
from .plan import Plan
from .render import Source

# Warnings the generated C must compile cleanly under (issue 5 names the set).
STRICT_WARNINGS = (
    "-Wall", "-Wextra", "-Wpedantic", "-Wconversion", "-Wdouble-promotion", "-Wshadow",
    "-Wcast-qual", "-Wstrict-prototypes", "-Werror",
)
# Verification builds are portable x86-64/aarch64 code at -O2: the figures they give are the
# same on every machine with the same compiler, so manifests stay byte-identical.
HOST_FLAGS = ("-std=c99", "-O2", "-fPIC", *STRICT_WARNINGS)


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


def cdef_for(plan: Plan) -> str:
    """Return the cffi declarations of one layer's C entry points."""
    t = plan.scalar.ctype
    return (f"int {plan.prefix}_predict(const {t} *x, {t} *y, size_t batch);\n"
            f"int {plan.prefix}_predict_with_params(const {t} *x, {t} *y, size_t batch, "
            f"const {t} *scale, const {t} *offset);\n")


def with_openmp(plans: tuple[Plan, ...], flags: tuple[str, ...]) -> tuple[str, ...]:
    """Return flags plus -fopenmp when a layer asks for threads (the C guards it by _OPENMP)."""
    if any(p.threads > 1 for p in plans) and "-fopenmp" not in flags:
        return (*flags, "-fopenmp")
    return flags


@dataclass(frozen=True)
class BuiltModule:
    """A compiled cffi module: its folder in the cache and the loaded ffi/lib pair."""

    path: Path
    ffi: object
    lib: object


def _key(parts: list[str]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:24]


def build_c_module(plans: tuple[Plan, ...], sources: list[Source],
                   flags: tuple[str, ...] = HOST_FLAGS, cc: str = "cc",
                   keep: bool = False) -> BuiltModule:
    """Return the cffi module that exposes every layer's entry points, building it if needed."""
    cc_version = compiler_version(cc)
    flags = with_openmp(plans, flags)
    cdef = "".join(cdef_for(p) for p in plans)
    key = _key([__version__, cc, cc_version, sys.version, cffi.__version__, " ".join(flags),
                cdef, *(f"{s.name}\n{s.text}" for s in sources)])
    module_name = f"_gncodegen_{key}"
    folder = cache_root() / key
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    target = folder / f"{module_name}{suffix}"
    if not target.is_file():
        _compile_module(module_name, cdef, plans, sources, flags, cc, folder, target.name)
    spec = importlib.util.spec_from_file_location(module_name, target)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if keep:
        print(f"build folder: {folder}", file=sys.stderr)
    return BuiltModule(folder, module.ffi, module.lib)


def _compile_module(module_name: str, cdef: str, plans, sources, flags, cc, folder: Path,
                    filename: str) -> None:
    with staged_entry(folder, filename) as work:
        for s in sources:
            (work / s.name).write_text(s.text)
        objects = []
        for s in sources:
            if s.name.endswith(".c"):
                obj = s.name[:-2] + ".o"
                run_compiler(s.name, [cc, *flags, "-c", s.name, "-o", obj], cwd=work)
                objects.append(obj)
        ffi = cffi.FFI()
        ffi.cdef(cdef)
        ffi.set_source(module_name, "".join(f'#include "{p.prefix}.h"\n' for p in plans))
        with contextlib.redirect_stdout(io.StringIO()):  # cffi announces what it writes
            ffi.emit_c_code(str(work / f"{module_name}.c"))
        py_include = sysconfig.get_paths()["include"]
        run_compiler("cffi wrapper", [cc, "-O1", "-fPIC", f"-I{py_include}", "-I.", "-c",
                                      f"{module_name}.c", "-o", f"{module_name}.o"], cwd=work)
        openmp = [f for f in flags if f == "-fopenmp"]
        run_compiler("link", [cc, "-shared", *openmp, f"{module_name}.o", *objects, "-lm",
                              "-o", filename], cwd=work)
