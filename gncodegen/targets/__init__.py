"""The registry of targets: each is a folder with its record, lowering, templates and runner.

Adding a target is one more folder beside these and one more line below. A target the machine
cannot serve raises TargetUnavailable naming what is missing.
"""

from __future__ import annotations

from ..errors import TargetUnavailable
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
    """Return the targets a --target value names."""
    names = TARGET_GROUPS.get(name, (name,))
    missing = [n for n in names if n not in TARGETS]
    if missing:
        raise TargetUnavailable(f"unknown target '{missing[0]}' "
                                f"(choose from {', '.join(target_choices())})")
    return tuple(TARGETS[n] for n in names)


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
           "TARGET_GROUPS", "resolve_targets", "target_choices", "cli_options", "spec_options"]
