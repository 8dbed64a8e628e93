"""The launch rules of the generated host code, as data.

The plan orders the rules; the generated `run()` prints them, one `if` each, and launches the
kernel of the first rule whose conditions hold; `chosen_variant` evaluates the same list in
Python, so the two cannot drift apart. A rule that needs the split workspace is passed over
when none can be had, and the next rule then decides.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .geometry import Variant, Variants

MISALIGNED = "misaligned"    # x or y not on a vector boundary
SM90 = "sm90"                # the device is compute capability 9 or newer (clusters)
FEW_BLOCKS = "few_blocks"    # a variant's blocks would leave SMs idle


@dataclass(frozen=True)
class Condition:
    """One test of a launch rule."""

    kind: str               # MISALIGNED, SM90 or FEW_BLOCKS
    team_groups: int = 1    # FEW_BLOCKS: the variant's teams own this many groups each
    cluster: int = 1        # FEW_BLOCKS: ... and take this many blocks each

    def holds(self, env: DispatchEnv) -> bool:
        """Whether the condition holds for one call."""
        if self.kind == MISALIGNED:
            return not env.aligned
        if self.kind == SM90:
            return env.cc_major >= 9
        return env.teams // self.team_groups * self.cluster < env.few_blocks


@dataclass(frozen=True)
class Rule:
    """Launch `variant` when every condition holds (and the workspace can be had, if needed)."""

    variant: Variant
    when: tuple[Condition, ...]
    workspace: bool          # the split kernels: only when the workspace is allocated
    why: str


@dataclass(frozen=True)
class DispatchEnv:
    """What the host code knows when it picks a kernel."""

    teams: int               # batch * groups
    cc_major: int
    few_blocks: int          # SMs * blocks per SM below which SMs idle
    aligned: bool = True
    workspace: bool = True   # whether the split workspace can be had


def few(v: Variant) -> Condition:
    """The condition that v's launch would leave SMs idle."""
    return Condition(FEW_BLOCKS, v.team_groups, v.cluster)


def dispatch_rules(v: Variants, gives_way: Callable[[Variant], bool]) -> tuple[Rule, ...]:
    """Return the ordered launch rules of a layer's variants.

    gives_way(variant): whether that variant, launched with too few blocks, is replaced by the
    split kernels (a looped variant of a layer that has them).
    """
    rules = [Rule(v.scalar, (Condition(MISALIGNED),), False, v.scalar.why)]
    if v.warp is not None:
        rules.append(Rule(v.warp, (), False, v.warp.why))
        return tuple(rules)

    def add(variant: Variant, when: tuple[Condition, ...]) -> None:
        if gives_way(variant):
            rules.append(Rule(v.split, (*when, few(variant)), True,
                              f"too few blocks for {variant.name}'s two sweeps: split the groups"))
        rules.append(Rule(variant, when, False, variant.why))

    if v.wide is not None:
        add(v.wide, (Condition(SM90), few(v.narrow or v.portable)))
    if v.narrow is not None:
        add(v.narrow, (Condition(SM90),))
    add(v.portable, ())
    assert not rules[-1].when and not rules[-1].workspace, rules[-1]
    return tuple(rules)


def evaluate(rules: tuple[Rule, ...], env: DispatchEnv) -> Variant:
    """Return the variant the rules launch for one call (what the generated run() does)."""
    for rule in rules:
        if all(c.holds(env) for c in rule.when) and (env.workspace or not rule.workspace):
            return rule.variant
    raise AssertionError("the last launch rule always holds")
