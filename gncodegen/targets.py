"""The targets gncodegen renders for, as data: each renders sources and knows how to verify them.

A target the machine cannot serve raises TargetUnavailable naming what is missing; a target
that does not exist yet says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from .errors import SpecError, TargetUnavailable
from .firmware import FIRMWARE_TARGETS, verifier as firmware_verifier
from .plan import Plan
from .render import Source, render_c
from .spec import Spec
from .verify import Report


@dataclass(frozen=True)
class Outcome:
    """What verifying a target produced: reports, manifest extras and table lines to print."""

    reports: tuple[Report, ...]
    manifest: dict = field(default_factory=dict)
    notes: tuple[str, ...] = ()


# How the CUDA target runs its verification: on a GPU when one is found (auto), only on a GPU
# (gpu: an error without one), or under the host emulation even where a GPU exists.
CUDA_RUNNERS = ("auto", "gpu", "emulation")


@dataclass(frozen=True)
class VerifyOptions:
    """What the caller asked of verification, passed to every target's verify hook."""

    keep: bool = False              # print where the build folder is
    cuda_runner: str = "auto"       # one of CUDA_RUNNERS


@dataclass(frozen=True)
class Target:
    """One target: which dtypes it takes, how it renders, how it verifies."""

    name: str
    description: str
    dtypes: tuple[str, ...]
    render: Callable[[Spec, tuple[Plan, ...]], list[Source]]
    verify: Callable[[Spec, tuple[Plan, ...], list[Source], VerifyOptions], Outcome]

    def check(self, spec: Spec) -> None:
        """Raise SpecError when a layer's dtype is one this target cannot produce."""
        for layer in spec.layers:
            if layer.dtype not in self.dtypes:
                raise SpecError(f"{layer.field_prefix}dtype",
                                f"{layer.dtype} is not available on the {self.name} target "
                                f"(it takes {', '.join(self.dtypes)})")


def render_c_sources(spec: Spec, plans: tuple[Plan, ...]) -> list[Source]:
    """Return every layer's C header and source."""
    name = spec.path.replace("\\", "/").rsplit("/", 1)[-1]
    return [src for plan in plans for src in render_c(plan, name)]


def verify_c(spec: Spec, plans: tuple[Plan, ...], sources: list[Source],
             options: VerifyOptions) -> Outcome:
    """Build the C sources for this host with cffi and verify every layer."""
    from .build import build_c_module
    from .verify import c_runner, verify_layer

    c_sources = [s for s in sources if s.name.endswith((".c", ".h")) and
                 not s.name.endswith("_cuda.h")]
    module = build_c_module(plans, c_sources, keep=options.keep)
    return Outcome(tuple(verify_layer(p.layer, "c", "host", c_runner(p, module))
                         for p in plans))


def _cuda():
    """Return the CUDA target's module (imported on first use)."""
    from . import cuda_target
    return cuda_target


TARGETS: dict[str, Target] = {
    "c": Target("c", "portable C99 (host build through cffi)", ("single", "double"),
                render_c_sources, verify_c),
    "cuda": Target("cuda", "CUDA (nvcc; verified on a GPU or under host emulation)",
                   ("single", "double", "half", "bfloat16"),
                   lambda spec, plans: _cuda().render_cuda_sources(spec, plans),
                   lambda *args: _cuda().verify_cuda(*args)),
    # The C sources built for a core and run under QEMU (gncodegen.firmware).
    **{t.name: Target(t.name, t.description, ("single", "double"), render_c_sources,
                      firmware_verifier(t.name)) for t in FIRMWARE_TARGETS.values()},
}
# Names --target accepts besides the targets themselves.
TARGET_GROUPS = {"all": ("c", "cuda"), "firmware": tuple(FIRMWARE_TARGETS)}


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
