"""The registry of targets: each is a folder with its record, lowering, templates and runner.

Adding a target is one more folder beside these and one more line below. A target the machine
cannot serve raises TargetUnavailable naming what is missing.
"""

from __future__ import annotations

from ..errors import SpecError
from ..options import SpecOption
from .base import CliOption, Outcome, RunOptions, Target, TargetRecord
from . import c, cuda, firmware

TARGETS: dict[str, Target] = {t.name: t for t in (
    c.TARGET,
    cuda.TARGET,
    *firmware.TARGETS,
)}
# Names --target accepts besides the targets themselves.
TARGET_GROUPS = {"all": ("c", "cuda"), "firmware": tuple(t.name for t in firmware.TARGETS)}


def resolve_targets(name: str) -> tuple[Target, ...]:
    """Return the targets a --target value names: one name, a group (all, firmware), or a
    comma-separated list of them, each target once in the order given."""
    names: list[str] = []
    for part in name.lower().split(","):
        part = part.strip()
        for n in TARGET_GROUPS.get(part, (part,)):
            if n not in TARGETS:
                raise SpecError("--target", f"unknown target '{n}' (choose from "
                                            f"{', '.join(target_choices())}, or several "
                                            "separated by commas)")
            if n not in names:
                names.append(n)
    return tuple(TARGETS[n] for n in names)


def target_help() -> str:
    """Return what --target takes, for the command line's help."""
    groups = "; ".join(f"{g} = {', '.join(ts)}" for g, ts in TARGET_GROUPS.items())
    return (f"What to generate: {', '.join(TARGETS)}, a group ({groups}), or several "
            "separated by commas, e.g. c,cortex-m4.")


def target_choices() -> list[str]:
    """Return every value --target accepts."""
    return [*TARGETS, *TARGET_GROUPS]


def spec_options() -> tuple[SpecOption, ...]:
    """Return every target's own spec keys, each once."""
    seen: dict[str, SpecOption] = {}
    for target in TARGETS.values():
        for option in target.spec_options:
            assert seen.get(option.key, option) is option, option.key
            seen[option.key] = option
    return tuple(seen.values())


def cli_options() -> tuple[CliOption, ...]:
    """Return every target's own command-line options, each once."""
    seen: dict[str, CliOption] = {}
    for target in TARGETS.values():
        for option in target.cli_options:
            seen.setdefault(option.name, option)
    return tuple(seen.values())


__all__ = ["CliOption", "Outcome", "RunOptions", "Target", "TargetRecord", "TARGETS",
           "TARGET_GROUPS", "resolve_targets", "target_choices", "target_help", "cli_options",
           "spec_options"]
