"""The steps `gncodegen build` chains: load, lower, lower per target, render, verify.

Writing the result is gncodegen.output's job. Each target lowers every layer once; rendering,
verification, the manifest and `gncodegen show` read those records.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .errors import GncodegenError, SpecError
from .plan import Plan, lower_spec
from .progress import say
from .render import Source
from .text import counted
from . import spec as specs
from .spec import Spec
from .verify import check_verifiable
from .targets import (TARGETS, Outcome, RunOptions, Target, TargetRecord, cli_options,
                      resolve_targets, spec_options)


def load_spec(path: str | Path, allow_code: bool = False) -> Spec:
    """Return the validated Spec of a YAML file, every target's own keys accepted."""
    return specs.load_spec(path, allow_code=allow_code, options=spec_options())


def parse_spec(text: str, base_dir: Path, stem: str, path: str = "<string>",
               allow_code: bool = False) -> Spec:
    """Return the validated Spec of YAML text, every target's own keys accepted."""
    return specs.parse_spec(text, base_dir, stem, path, allow_code, options=spec_options())


@dataclass(frozen=True)
class Result:
    """Everything one run produced: the files, each target's outcome and the manifest."""

    spec: Spec
    plans: tuple[Plan, ...]
    targets: tuple[Target, ...]
    records: dict[str, tuple[TargetRecord, ...]]    # each target's record of every layer
    sources: tuple[Source, ...]
    outcomes: dict[str, Outcome]
    manifest: str

    @property
    def passed(self) -> bool:
        """True when every verified layer passed on every target."""
        return all(r.passed and not o.failures
                   for o in self.outcomes.values() for r in o.reports)


def lower_targets(spec: Spec, plans: tuple[Plan, ...], targets: tuple[Target, ...]
                  ) -> dict[str, tuple[TargetRecord, ...]]:
    """Return each target's records of the layers, after checking the spec suits it."""
    out = {}
    for target in targets:
        target.check(spec)
        out[target.name] = tuple(target.lower(plan) for plan in plans)
    return out


def render_all(spec: Spec, targets: tuple[Target, ...],
               records: dict[str, tuple[TargetRecord, ...]]) -> list[Source]:
    """Return the sources of every target, each file once, in a stable order."""
    files: dict[str, Source] = {}
    for target in targets:
        for src in target.render(spec, records[target.name]):
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
        allow_code: bool = False, options: RunOptions = RunOptions()) -> Result:
    """Return the Result of loading, rendering and (unless told not to) verifying a spec."""
    spec = load_spec(spec_path, allow_code=allow_code)
    targets = resolve_targets(target)
    return run_spec(spec, targets, verify, options)


def check_options(targets: tuple[Target, ...], options: RunOptions) -> None:
    """Refuse, before any work, free-text options (compiler flags) that no chosen target takes:
    they would be silently ignored."""
    given = dict(options.values)
    for opt in cli_options():
        if opt.choices or given.get(opt.name, opt.default) == opt.default:
            continue
        if not any(opt in t.cli_options for t in targets):
            takers = [t.name for t in TARGETS.values() if opt in t.cli_options]
            raise SpecError(opt.flag, f"only {', '.join(takers)} take it, not "
                                      f"{', '.join(t.name for t in targets)}")


def run_spec(spec: Spec, targets: tuple[Target, ...], verify: bool = True,
             options: RunOptions = RunOptions()) -> Result:
    """Return the Result of lowering, rendering and (unless told not to) verifying a Spec."""
    check_options(targets, options)
    if verify:
        for layer in spec.layers:
            check_verifiable(layer)
    plans = lower_spec(spec)
    records = lower_targets(spec, plans, targets)
    sources = render_all(spec, targets, records)
    outcomes: dict[str, Outcome] = {}
    if verify:
        for t in targets:
            say(f"{t.name}: building and verifying {counted(len(spec.layers), 'layer')}")
            outcomes[t.name] = t.verify(spec, records[t.name], sources, options)
    return Result(spec, plans, targets, records, tuple(sources), outcomes,
                  manifest_text(spec, targets, sources, outcomes))


def merge_earlier(result: Result, out_dir: str | Path) -> tuple[dict[str, str], str, list[str]]:
    """Return the files and manifest to write for a build into out_dir, and what was kept or
    dropped of what is there, in words.

    The rule: a build rewrites the files of the targets it built. Another target's files that an
    earlier build of the same spec (the same bytes, the same gncodegen) wrote into the folder
    are kept, with their verification figures, and the manifest lists both builds' targets; an
    earlier build of anything else is replaced whole, and the build says which targets' files
    it removed.
    """
    from .output import MANIFEST, owned_files, resolve_output

    files = {s.name: s.text for s in result.sources}
    final = resolve_output(out_dir)
    if not final.is_dir() or not owned_files(final):
        return files, result.manifest, []
    try:
        old = json.loads((final / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return files, result.manifest, []
    built = [t.name for t in result.targets]
    others = [t for t in old.get("targets", []) if t not in built]
    if not others:
        return files, result.manifest, []
    same = (old.get("spec", {}).get("sha256") == result.spec.sha256
            and old.get("generator") == f"gncodegen {__version__}"
            and _still_rendered(result, others, final))
    if not same:
        return files, result.manifest, [
            f"removed the files of {', '.join(others)}: they were built from another spec (or "
            "its parameters), or another version of it or of gncodegen"]
    for name in old.get("files", {}):
        if name not in files:
            files[name] = (final / name).read_text(encoding="utf-8")
    new = json.loads(result.manifest)
    targets = [t for t in TARGETS if t in built or t in others]
    doc = {key: new[key] for key in ("generator", "spec", "layers")}
    doc["targets"] = targets
    doc["files"] = {name: hashlib.sha256(files[name].encode()).hexdigest()
                    for name in sorted(files)}
    doc["verification"] = [v for v in old.get("verification", []) if v.get("target") in others]
    doc["verification"] += new.get("verification", [])
    for t in targets:
        section = new.get(t) if t in built else old.get(t)
        if section:
            doc[t] = section
    return files, json.dumps(doc, indent=2, sort_keys=False) + "\n", [
        f"kept the files of {', '.join(others)} from the earlier build of this spec"]


def _still_rendered(result: Result, others: list[str], final: Path) -> bool:
    """True when the other targets' files in the folder are exactly what this spec renders for
    them now: the same spec file with other parameter files (a retrained .npz) is not the
    same build, nor is a folder one of whose files has gone."""
    try:
        targets = tuple(TARGETS[t] for t in others)
        sources = render_all(result.spec, targets,
                             lower_targets(result.spec, result.plans, targets))
        for src in sources:
            if (final / src.name).read_text(encoding="utf-8") != src.text:
                return False
    except (GncodegenError, KeyError, OSError, UnicodeDecodeError):
        return False
    return True
