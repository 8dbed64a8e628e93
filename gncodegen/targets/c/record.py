"""The C target's record: everything the C templates print for one layer."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...activations import literals
from ...dtypes import Spelling, c_literals
from ...plan import Loop, Plan
from ...render import printed
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
    inv_group_numel_literal: str    # 1 / elements per group ("" for runtime sizes)
    largest_literal: str            # the largest finite value of the accumulation type
    scale_literals: tuple[str, ...]
    offset_literals: tuple[str, ...]
    kernel: CKernel
    kernel_comment: tuple[str, ...]  # the header's "C kernel" comment
    batch_rule: str                 # when a batch count is refused, in words
    style: Style                    # how the shared numerics are spelled here
    summary: tuple[str, ...]
    runtime_params: tuple[tuple[str, str], ...] = ()   # (type, name) the nests take, in order
    sums_uses: frozenset = frozenset()   # which of them the group sums, the group apply and a
    apply_uses: frozenset = frozenset()  # job read (a job passes its nests theirs)
    job_uses: frozenset = frozenset()
    rows_uses: frozenset = frozenset()   # ... and the rows kernel's block sums
    activation_literals: dict = field(default_factory=dict)   # the fused activation's constants
    own_exp: bool = False           # single precision: the activation's e^x and erf are the
                                    # source's own (no libm call, loops stay vectorizable)


def _uses(loops: tuple[Loop, ...]) -> frozenset[str]:
    """Return the runtime values a loop nest reads: its strides' locals and its extents' sizes."""
    names = set()
    for lp in loops:
        if printed(lp):
            if lp.runtime_stride:
                names.add(lp.stride_expr)
            names.update(lp.extent_syms)
    return frozenset(names)


def runtime_values(plan: Plan, acc_ctype: str, group_stride: int
                   ) -> tuple[tuple[tuple[str, str], ...], frozenset, frozenset, frozenset]:
    """Return the values the nests take at run time, in argument order (type, name), and the
    names the group sums, the group apply and a job each read (a job passes its nests theirs).

    Fixed sizes: the strides that hold the batch. Runtime sizes: also the sizes in the loop
    extents, the observation stride and 1 / elements per group.
    """
    lay = plan.layout
    ordered = [("size_t", lp.stride_expr) for lp in lay.runtime_strides]
    ordered += [("size_t", r.name) for r in plan.runtime_sizes]
    if lay.batch_stride_syms:
        ordered.append(("size_t", "obs_stride"))
    if plan.runtime_sizes:
        ordered.append((acc_ctype, "inv_numel"))
    sums, apply = _uses(lay.stats_loops), _uses(lay.group_loops)
    base = set()
    if not group_stride:
        if plan.has_batch and lay.batch_stride_syms:
            base.add("obs_stride")
        if plan.channel_loop.runtime_stride:
            base.add(plan.channel_loop.stride_expr)
    job = sums | apply | base | ({"inv_numel"} if plan.runtime_sizes else set())
    return tuple(ordered), sums, apply, frozenset(job)


def lower_c(plan: Plan, threads: int | None = None) -> CRecord:
    """Return the C record of a layer (threads: the spec's unless given)."""
    dt = plan.dtype
    kernel = plan_kernel(plan, THREADS.value(plan.layer) if threads is None else threads)
    comment = kernel_comment(plan, kernel)
    if plan.has_batch:
        batch_rule = f"batch * {plan.observation_numel_expr} overflows size_t"
    else:
        batch_rule = "the format has no B dimension, so batch must be 1"
    ordered, sums, apply, job = runtime_values(plan, dt.spelling.ctype, kernel.group_stride)
    return CRecord(
        runtime_params=ordered, sums_uses=sums, apply_uses=apply, job_uses=job,
        rows_uses=_uses(kernel.row_loops),
        activation_literals=literals(plan.layer.activation, dt.acc),
        own_exp=bool(plan.layer.activation.libm) and dt.acc == "single",
        plan=plan, ctype=dt.spelling.ctype, acc=dt.spelling,
        epsilon_literal=dt.literal(plan.layer.epsilon),
        inv_group_numel_literal=dt.literal(1.0 / plan.group_numel) if plan.group_numel else "",
        largest_literal=dt.literal(dt.accumulator.largest),
        scale_literals=c_literals(plan.scale_values, dt.acc),
        offset_literals=c_literals(plan.offset_values, dt.acc),
        kernel=kernel, kernel_comment=comment, batch_rule=batch_rule,
        style=Style("static", dt.spelling, dt.spelling.ctype, f"{plan.prefix}_stats",
                    f"{plan.prefix}_finish", f"{plan.prefix}_split_mean",
                    "inv_numel" if plan.runtime_sizes else f"{plan.macro}_INV_GROUP_NUMEL",
                    f"{plan.macro}_EPSILON", inv_param=bool(plan.runtime_sizes)),
        summary=(*plan.summary, *comment),
    )


def as_record(item: Plan | CRecord) -> CRecord:
    """Return a C record as it is, or the C record of a Plan (callers from Python may hold either)."""
    return item if isinstance(item, CRecord) else lower_c(item)
