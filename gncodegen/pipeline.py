"""The steps `gncodegen build` chains: load, lower, render, verify, then write atomically."""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .errors import GncodegenError, SpecError
from .plan import Plan, lower_spec
from .render import Source
from .spec import Spec, load_spec
from .targets import Outcome, Target, VerifyOptions, resolve_targets

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Result:
    """Everything one run produced: the files, each target's outcome and the manifest."""

    spec: Spec
    plans: tuple[Plan, ...]
    targets: tuple[Target, ...]
    sources: tuple[Source, ...]
    outcomes: dict[str, Outcome]
    manifest: str

    @property
    def passed(self) -> bool:
        """True when every verified layer passed on every target."""
        return all(r.passed for o in self.outcomes.values() for r in o.reports)


def render_all(spec: Spec, plans: tuple[Plan, ...], targets: tuple[Target, ...]) -> list[Source]:
    """Return the sources of every target, each file once, in a stable order."""
    files: dict[str, Source] = {}
    for target in targets:
        target.check(spec)
        for src in target.render(spec, plans):
            if src.name in files and files[src.name].text != src.text:
                raise GncodegenError(f"two targets render different {src.name}")
            files[src.name] = src
    return list(files.values())


def manifest_text(spec: Spec, targets: tuple[Target, ...], sources: list[Source],
                  outcomes: dict[str, Outcome]) -> str:
    """Return manifest.json: generator, spec hash, file hashes and verification figures."""
    doc = {
        "generator": f"gncodegen {__version__}",
        "spec": {"file": Path(spec.path).name, "sha256": spec.sha256},
        "layers": [layer.name for layer in spec.layers],
        "targets": [t.name for t in targets],
        "files": {s.name: hashlib.sha256(s.text.encode()).hexdigest()
                  for s in sorted(sources, key=lambda s: s.name)},
        "verification": [r.as_dict() for o in outcomes.values() for r in o.reports],
    }
    for name, outcome in outcomes.items():
        if outcome.manifest:
            doc[name] = outcome.manifest
    return json.dumps(doc, indent=2, sort_keys=False) + "\n"


def run(spec_path: str | Path, target: str = "c", verify: bool = True,
        allow_code: bool = False, options: VerifyOptions = VerifyOptions()) -> Result:
    """Return the Result of loading, rendering and (unless told not to) verifying a spec."""
    spec = load_spec(spec_path, allow_code=allow_code)
    targets = resolve_targets(target)
    plans = lower_spec(spec)
    sources = render_all(spec, plans, targets)
    outcomes: dict[str, Outcome] = {}
    if verify:
        for t in targets:
            outcomes[t.name] = t.verify(spec, plans, sources, options)
    return Result(spec, plans, targets, tuple(sources), outcomes,
                  manifest_text(spec, targets, sources, outcomes))


# --------------------------------------------------------------------------- atomic output


def _written_by_us(folder: Path) -> bool:
    """True when every file in folder is listed in its gncodegen manifest (or it is empty)."""
    entries = {p.name for p in folder.iterdir()}
    if not entries:
        return True
    try:
        doc = json.loads((folder / MANIFEST).read_text())
        listed = set(doc["files"]) | {MANIFEST}
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return entries <= listed and str(doc.get("generator", "")).startswith("gncodegen")


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with renameat2(RENAME_EXCHANGE); False where unsupported."""
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    if not hasattr(libc, "renameat2"):
        return False
    at_fdcwd, rename_exchange = -100, 2
    rc = libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return rc == 0


def write_output(out_dir: str | Path, sources: tuple[Source, ...], manifest: str) -> Path:
    """Write the sources and manifest into out_dir, replacing it whole and atomically."""
    out = Path(out_dir)
    old = out.with_name(f".{out.name}.old")
    if old.is_dir() and not out.exists():
        # A run of the fallback below was killed between its two renames: the previous
        # output is complete in `old`, so put it back before anything else.
        os.rename(old, out)
    if out.exists() and not out.is_dir():
        raise SpecError("output", f"{out} exists and is not a folder")
    if out.is_dir() and not _written_by_us(out):
        raise SpecError("output", f"{out} holds files gncodegen did not write; "
                                  "choose an empty or new folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for src in sources:
            (stage / src.name).write_text(src.text)
        (stage / MANIFEST).write_text(manifest)
        for f in stage.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if not out.exists():
            os.rename(stage, out)
        elif _exchange(stage, out):
            shutil.rmtree(stage)         # stage now holds the old contents
        else:
            # No atomic exchange here (filesystem or OS): a short window in which out is
            # missing, repaired by the next run from `old` (see the top).
            shutil.rmtree(old, ignore_errors=True)
            os.rename(out, old)
            os.rename(stage, out)
            shutil.rmtree(old)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
    # A previous output left by a fallback run killed before its clean-up.
    shutil.rmtree(old, ignore_errors=True)
    return out
