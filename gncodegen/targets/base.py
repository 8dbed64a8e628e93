"""What a target is to the pipeline: the protocol every target folder implements.

A target turns the target-independent Plan of each layer into its own record (`lower`, once per
build), renders sources from those records, and verifies the sources it rendered. Everything a
target decides (kernel strategy, launch geometry, dispatch rules, the literals it prints) lives
in its record, so that rendering, verification, `gncodegen show --target` and the manifest all
read the same decisions. This module imports no target: targets import it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import SpecError, TargetUnavailable
from ..options import SpecOption
from ..plan import Plan
from ..render import Source
from ..spec import Spec
from ..verify import Report


@dataclass(frozen=True)
class Outcome:
    """What verifying a target produced: reports, manifest extras and table lines to print."""

    reports: tuple[Report, ...]
    manifest: dict = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    failures: tuple[str, ...] = ()   # what fails the build besides the reports (a budget)


@dataclass(frozen=True)
class CliOption:
    """A command-line option a target declares; `build` and `verify` take it as --<flag>."""

    name: str                        # the keyword: cuda_runner
    choices: tuple[str, ...]         # () for free text
    default: str
    help: str

    @property
    def flag(self) -> str:
        """The option as typed: --cuda-runner."""
        return "--" + self.name.replace("_", "-")


@dataclass(frozen=True)
class RunOptions:
    """What the caller asked of verification: shared options and each target's own."""

    keep: bool = False               # print where the build folders are
    values: tuple[tuple[str, str], ...] = ()   # target options by name, as given

    def get(self, option: CliOption) -> str:
        """Return the value given for a target's option, or its default."""
        return dict(self.values).get(option.name, option.default)


class TargetRecord:
    """What every target's record offers besides its own fields (a mixin of frozen records).

    `plan` is the layer's Plan; `summary` the lines `gncodegen show --target` prints.
    """

    plan: Plan
    summary: tuple[str, ...]


class Target:
    """One target. A target folder subclasses it and overrides the hooks that differ."""

    name: str = ""
    description: str = ""
    dtypes: tuple[str, ...] = ()
    cli_options: tuple[CliOption, ...] = ()
    spec_options: tuple[SpecOption, ...] = ()

    def check(self, spec: Spec) -> None:
        """Raise SpecError when a layer asks for something this target cannot produce."""
        for layer in spec.layers:
            if layer.dtype not in self.dtypes:
                raise SpecError(f"{layer.field_prefix}dtype",
                                f"{layer.dtype} is not available on the {self.name} target "
                                f"(it takes {', '.join(self.dtypes)})")

    def lower(self, plan: Plan) -> TargetRecord:
        """Return this target's record for one layer."""
        raise NotImplementedError

    def render(self, spec: Spec, records: tuple[TargetRecord, ...]) -> list[Source]:
        """Return every file this target writes for the layers' records."""
        raise NotImplementedError

    def verify(self, spec: Spec, records: tuple[TargetRecord, ...], sources: list[Source],
               options: RunOptions) -> Outcome:
        """Build the sources with the real toolchain, run them and compare with the reference."""
        raise NotImplementedError

    def describe(self, record: TargetRecord) -> tuple[str, ...]:
        """Return the lines `gncodegen show --target` prints for one layer."""
        return record.summary

    def lacks(self, feature: str) -> TargetUnavailable:
        """Return the error for a feature this target cannot express, naming both."""
        return TargetUnavailable(f"the {self.name} target cannot produce {feature}")
