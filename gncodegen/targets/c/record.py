"""The C target's record: everything the C templates print for one layer."""

from __future__ import annotations

from dataclasses import dataclass

from ...dtypes import Spelling, c_literals
from ...plan import Plan
from ..base import TargetRecord
from ..cfamily import Style
from .kernel import THREADS, CKernel, kernel_comment, plan_kernel


@dataclass(frozen=True)
class CRecord(TargetRecord):
    """One layer lowered for C: its types, literals and kernel strategy."""

    plan: Plan
    ctype: str                      # element type in memory (C computes in it too)
    acc: Spelling                   # how the accumulation type is spelled
    epsilon_literal: str
    inv_group_numel_literal: str    # 1 / elements per group
    largest_literal: str            # the largest finite value of the accumulation type
    scale_literals: tuple[str, ...]
    offset_literals: tuple[str, ...]
    kernel: CKernel
    kernel_comment: tuple[str, ...]  # the header's "C kernel" comment
    batch_rule: str                 # when a batch count is refused, in words
    style: Style                    # how the shared numerics are spelled here
    summary: tuple[str, ...]


def lower_c(plan: Plan, threads: int | None = None) -> CRecord:
    """Return the C record of a layer (threads: the spec's unless given)."""
    dt = plan.dtype
    kernel = plan_kernel(plan, THREADS.value(plan.layer) if threads is None else threads)
    comment = kernel_comment(plan, kernel)
    if plan.has_batch:
        batch_rule = f"batch * {plan.observation_numel} overflows size_t"
    else:
        batch_rule = "the format has no B dimension, so batch must be 1"
    return CRecord(
        plan=plan, ctype=dt.spelling.ctype, acc=dt.spelling,
        epsilon_literal=dt.literal(plan.layer.epsilon),
        inv_group_numel_literal=dt.literal(1.0 / plan.group_numel),
        largest_literal=dt.literal(dt.accumulator.largest),
        scale_literals=c_literals(plan.scale_values, dt.acc),
        offset_literals=c_literals(plan.offset_values, dt.acc),
        kernel=kernel, kernel_comment=comment, batch_rule=batch_rule,
        style=Style("static", dt.spelling, dt.spelling.ctype, f"{plan.prefix}_stats",
                    f"{plan.prefix}_finish", f"{plan.prefix}_split_mean",
                    f"{plan.macro}_INV_GROUP_NUMEL", f"{plan.macro}_EPSILON"),
        summary=(*plan.summary, *comment),
    )


def as_record(item: Plan | CRecord) -> CRecord:
    """Return a C record as it is, or the C record of a Plan (callers from Python may hold either)."""
    return item if isinstance(item, CRecord) else lower_c(item)
