"""Interrupted runs: SIGKILL `gncodegen build` part-way, then check that the
output folder is either exactly as before or exactly the complete new output, that nothing but
gncodegen's hidden staging folders appeared beside it, and that the build cache still works:
every cache entry is complete, the next build succeeds and reuses cached modules.

Kill points are exact: the CLI runs under a small wrapper that counts calls to the pipeline's
steps (compiler runs, staged file writes, fsyncs, the folder exchange, the clean-up) and kills
its own process with SIGKILL at the chosen one. A second set kills the whole process group
from outside while the C compiler is running (a `cc` on PATH that waits), and a third kills at
spread-out times.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import slow_cc

# Runs the CLI with SIGKILL at the GN_KILL_AT='<point>:<n>'th call of a pipeline step.
WRAPPER = r"""
import os, pathlib, signal, sys
import gncodegen.targets.c.runner as build
import gncodegen.output as output

point, nth = os.environ["GN_KILL_AT"].rsplit(":", 1)
seen = {}

def hit(tag):
    seen[tag] = seen.get(tag, 0) + 1
    if tag == point and seen[tag] == int(nth):
        os.kill(os.getpid(), signal.SIGKILL)

def wrap(owner, name, tag, after=False):
    orig = getattr(owner, name)
    def hooked(*args, **kwargs):
        if not after:
            hit(tag)
        result = orig(*args, **kwargs)
        if after:
            hit(tag)
        return result
    setattr(owner, name, hooked)

if os.environ.get("GN_NO_EXCHANGE"):   # as on a filesystem without RENAME_EXCHANGE
    output._rename2 = lambda a, b, flags: False
wrap(build, "run_compiler", "compile")
wrap(build, "run_compiler", "compiled", after=True)
wrap(output, "_exchange", "exchange")
wrap(output, "_exchange", "exchanged", after=True)
wrap(output, "_rename_new", "rename-new")
wrap(output, "_rename_new", "rename-newd", after=True)
wrap(output, "_write_file", "stage-write")
wrap(output, "_write_file", "stage-written", after=True)
wrap(output.os, "fsync", "fsync")
stage_prefix = "." + os.environ["GN_OUT_NAME"] + "."
orig_rename = os.rename
def rename(src, dst, *args, **kwargs):
    # The staged output's rename, the old output's (fallback without exchange), the cache's.
    base = os.path.basename(str(src))
    tag = ("rename-out" if base.startswith(stage_prefix) else
           "rename-old" if base == os.environ["GN_OUT_NAME"] else "rename-cache")
    hit(tag)
    orig_rename(src, dst, *args, **kwargs)
    hit(tag + "d")
os.rename = rename
wrap(output, "_remove_owned", "rmtree")

from gncodegen.cli import main
sys.argv = ["gncodegen", *sys.argv[1:]]
main()
"""

SPEC = """\
layers:
  - name: first
    num_groups: 4
    format: SSCB
    input_size: [9, 7, 8]
    epsilon: {eps}
    scale_initializer: narrow-normal
    offset_initializer: narrow-normal
  - name: second
    num_groups: 2
    format: CBT
    input_size: [6, 17]
    dtype: double
"""


_expected: dict[str, dict[str, bytes] | None] = {}


def snapshot(folder: Path) -> dict[str, bytes] | None:
    """Return {file name: bytes} of a folder, or None when it does not exist."""
    if not folder.exists():
        return None
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


class Scene:
    """A spec folder with an output folder from an earlier build and its own build cache."""

    def __init__(self, root: Path, eps: str = "1.0e-3", template: Path | None = None):
        self.root = root
        self.cache = root / "cache"
        self.out = root / "work" / "out"
        self.spec = root / "work" / "gn.yaml"
        if template is not None:    # a copy of a scene built earlier: same files, own cache
            shutil.copytree(template / "work", root / "work", symlinks=True)
            shutil.copytree(template / "cache", self.cache, symlinks=True)
        else:
            self.spec.parent.mkdir(parents=True)
            self.write_spec("1.0e-5")
            self.cli("build", str(self.spec), "-o", str(self.out))
        self.before = snapshot(self.out)
        # The new spec, and what a complete build of it writes (built once per eps).
        self.write_spec(eps)
        if eps not in _expected:
            expected = root / "expected"
            self.cli("build", str(self.spec), "-o", str(expected), cache=root / "cache-expected")
            _expected[eps] = snapshot(expected)
            shutil.rmtree(expected)
        self.after = _expected[eps]
        assert self.after != self.before
        self.siblings = sorted(p.name for p in self.out.parent.iterdir())

    def write_spec(self, eps: str) -> None:
        self.spec.write_text(SPEC.format(eps=eps))

    def env(self, cache: Path | None = None, **extra) -> dict:
        return {**os.environ, "GNCODEGEN_CACHE": str(cache or self.cache), **extra}

    def cli(self, *args: str, cache: Path | None = None) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, "-P", "-m", "gncodegen.cli", *args],
                              env=self.env(cache), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc

    def killed_build(self, point: str, out: Path | None = None,
                     **env: str) -> subprocess.CompletedProcess:
        out = out or self.out
        return subprocess.run([sys.executable, "-P", "-c", WRAPPER, "build", str(self.spec),
                               "-o", str(out)],
                              env=self.env(GN_KILL_AT=point, GN_OUT_NAME=out.name, **env),
                              capture_output=True, text=True, timeout=300)

    def check_after_kill(self) -> str:
        """Assert the invariants after a killed run; return which state the output is in."""
        now = snapshot(self.out)
        assert now in (self.before, self.after), (
            f"half-written output folder: {sorted(now) if now else now}")
        extra = sorted(set(p.name for p in self.out.parent.iterdir()) - set(self.siblings))
        assert all(name.startswith(".out.") for name in extra), extra
        for entry in self.cache.iterdir():
            if not entry.name.startswith("."):
                assert any(entry.glob("*.so")), f"cache entry {entry.name} has no module"
        return "before" if now == self.before else "after"

    def check_recovers(self) -> None:
        """Assert a plain build now succeeds and writes the complete new output."""
        self.cli("build", str(self.spec), "-o", str(self.out))
        assert snapshot(self.out) == self.after
        entries = sorted(p.name for p in self.cache.iterdir() if not p.name.startswith("."))
        self.cli("verify", str(self.spec))
        # verify loaded the module the build cached: it added no entry.
        assert sorted(p.name for p in self.cache.iterdir()
                      if not p.name.startswith(".")) == entries


# (kill point, the state the output folder must then be in)
POINTS = [
    ("compile:1", "before"),        # before the first layer is compiled
    ("compiled:1", "before"),       # one object file in the work folder
    ("compile:3", "before"),        # before cffi's wrapper is compiled
    ("compile:4", "before"),        # before the link
    ("compiled:4", "before"),       # linked, not yet renamed into the cache
    ("rename-cached:1", "before"),  # cache entry in place, nothing written yet
    ("stage-write:1", "before"),    # staging folder created, empty
    ("stage-written:2", "before"),  # two of five files staged
    ("fsync:3", "before"),          # all staged, some synced
    ("exchange:1", "before"),       # right before the atomic swap
    ("exchanged:1", "after"),       # right after it: old contents still in the stage
    ("rmtree:1", "after"),          # while the old contents are being removed
]


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """Return a scene's folder (spec, output of the old spec, its cache) to copy per test."""
    root = tmp_path_factory.mktemp("template")
    Scene(root)
    return root


@pytest.mark.parametrize("point,state", POINTS, ids=[p for p, _ in POINTS])
def test_kill_at_step(tmp_path: Path, template: Path, point: str, state: str):
    """SIGKILL at one step: the output is old or new, never mixed; the cache stays usable."""
    scene = Scene(tmp_path, template=template)
    proc = scene.killed_build(point)
    assert proc.returncode == -signal.SIGKILL, (
        f"the run was not killed at {point}: {proc.returncode}\n{proc.stderr}")
    assert scene.check_after_kill() == state
    scene.check_recovers()


# (kill point, state right after the kill) on the fallback path without an atomic exchange
FALLBACK_POINTS = [
    ("rename-old:1", "before"),     # about to move the old output aside
    ("rename-oldd:1", "missing"),   # old output moved aside, new one not yet in place
    ("rename-outd:1", "after"),     # new output in place, old one not yet removed
]


@pytest.mark.parametrize("point,state", FALLBACK_POINTS, ids=[p for p, _ in FALLBACK_POINTS])
def test_kill_fallback_without_exchange(tmp_path: Path, template: Path, point: str, state: str):
    """Where RENAME_EXCHANGE is unsupported, out may be missing for a moment: the previous
    output is then complete beside it, and the next run puts it back or replaces it."""
    scene = Scene(tmp_path, template=template)
    proc = scene.killed_build(point, GN_NO_EXCHANGE="1")
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    old = scene.out.with_name(".out.old")
    if state == "missing":
        assert snapshot(scene.out) is None and snapshot(old) == scene.before
    else:
        assert scene.check_after_kill() == state
    scene.check_recovers()
    assert not old.exists()


def test_kill_into_new_folder(tmp_path: Path, template: Path):
    """Killed while writing a folder that did not exist: it is absent or complete, never partial."""
    scene = Scene(tmp_path, template=template)
    fresh = tmp_path / "work" / "fresh"
    for point in ("stage-written:3", "rename-new:1"):
        proc = scene.killed_build(point, fresh)
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        assert not fresh.exists()
    scene.cli("build", str(scene.spec), "-o", str(fresh))
    assert snapshot(fresh) == scene.after


def test_kill_group_while_compiling(tmp_path: Path, template: Path):
    """SIGKILL to the whole process group while the C compiler runs; a rebuild then works."""
    scene = Scene(tmp_path, template=template)
    extra, mark = slow_cc(tmp_path)
    env = scene.env(**extra)
    proc = subprocess.Popen([sys.executable, "-P", "-m", "gncodegen.cli", "build",
                             str(scene.spec), "-o", str(scene.out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not mark.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "compiler never ran"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert scene.check_after_kill() == "before"
    scene.check_recovers()


@pytest.mark.parametrize("delay", [0.2, 0.45, 0.7, 1.0])
def test_kill_at_a_time(tmp_path: Path, template: Path, delay: float):
    """SIGKILL after a delay, wherever the run is by then: the same invariants hold."""
    scene = Scene(tmp_path, template=template)
    proc = subprocess.Popen([sys.executable, "-P", "-m", "gncodegen.cli", "build",
                             str(scene.spec), "-o", str(scene.out)], env=scene.env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    time.sleep(delay)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    scene.check_after_kill()
    scene.check_recovers()
