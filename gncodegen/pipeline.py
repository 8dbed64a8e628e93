"""The steps `gncodegen build` chains: load, lower, render, verify, then write atomically."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .errors import GncodegenError
from .plan import Plan, lower_spec
from .render import Source
from .spec import Spec, load_spec
from .targets import Outcome, Target, VerifyOptions, resolve_targets

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
