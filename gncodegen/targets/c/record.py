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
class Backward:
    """How a training layer's backward sweeps one group (templates/c/train.c.j2).

    kind "runs": the innermost loop is a contiguous run within a channel, summed in `lanes`
    independent partial sums (vectorized without reassociating float additions); "rows":
    channels are fastest, so each row's channels add into per-channel sums elementwise; "nest":
    the group's loops as they are, one sum per channel.
    """

    kind: str
    lanes: int                      # runs: partial sums per channel
    outer: tuple[Loop, ...]         # runs, rows: the loops outside the innermost one
    inner: Loop | None              # runs, rows: the innermost loop (stride 1)
    compensated: bool               # rows, nest: per-channel sums with Kahan's compensation
    fold_rows: int = 64             # rows, compensated: rows summed plainly between folds
    block_groups: int = 1           # rows: neighbouring groups one job sweeps together, so that
                                    # each row's piece is whole cache lines (or as near as the
                                    # groups allow)


# Partial sums per channel in backward's runs: a vector or two of every SIMD width in single
# precision (4, 8, 16 floats), fewer in double.
BACKWARD_LANES = {"single": 16, "double": 8}


# The rows kind has each job's piece of a row fill whole cache lines, ROW_BYTES or more of them:
# a row's loop then runs long enough for its own cost not to count.
CACHE_LINE = 64
ROW_BYTES = 256


def _row_block(plan: Plan) -> int:
    """Return the groups a rows job sweeps: the fewest (dividing the groups) whose channels
    fill whole cache lines, ROW_BYTES or more; else the fewest that fill ROW_BYTES; else every
    group."""
    cpg, size = plan.channels_per_group, plan.dtype.bytes
    divisors = [b for b in range(1, plan.num_groups + 1) if plan.num_groups % b == 0]
    for fits in (lambda b: b * cpg * size % CACHE_LINE == 0 and b * cpg * size >= ROW_BYTES,
                 lambda b: b * cpg * size >= ROW_BYTES):
        found = [b for b in divisors if fits(b)]
        if found:
            return found[0]
    return plan.num_groups


def backward_lines(bw: Backward, plan: Plan) -> tuple[str, ...]:
    """Return the words of the header's kernel comment on a training layer's backward."""
    how = {"runs": f"each channel's contiguous runs in {bw.lanes} partial sums",
           "rows": f"row by row, {bw.block_groups} group{'s' if bw.block_groups > 1 else ''} "
                   f"({bw.block_groups * plan.channels_per_group} channels) a job",
           "nest": "the group's loop nest, one sum a channel"}[bw.kind]
    return ("backward: two sweeps a group; the sums of grad and grad*(x - mean) by",
            f"{how}{', compensated' if bw.compensated and bw.kind != 'runs' else ''}; the "
            "observations fold into dscale",
            "and doffset in order (the same bits on any number of threads)")


def plan_backward(plan: Plan) -> Backward:
    """Return how backward sweeps a group of the layer."""
    from .kernel import BLOCK_TERMS, PLAIN_TERMS
    loops = tuple(lp for lp in plan.layout.group_loops if printed(lp))
    lanes = BACKWARD_LANES[plan.dtype.acc]
    terms = plan.group_numel // plan.channels_per_group if not plan.runtime_sizes else None
    long_sums = terms is None or terms > PLAIN_TERMS
    if loops and loops[-1].stride == 1 and not loops[-1].runtime_stride:
        kind = "rows" if loops[-1].is_channel else "runs"
        run = loops[-1]
        if kind == "runs" and not run.extent_syms:
            lanes = min(lanes, 1 << (run.extent.bit_length() - 1))  # a short run: fewer lanes
        block = 1
        if kind == "rows":
            block = _row_block(plan)
        return Backward(kind, lanes, loops[:-1], run, long_sums, BLOCK_TERMS, block)
    return Backward("nest", 1, loops, None, long_sums, BLOCK_TERMS)


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
    factor_literals: dict = field(default_factory=dict)  # training: the learn-rate and L2 factors
    backward: Backward | None = None    # training: how backward sweeps a group


# A layer's training factors (MATLAB's ScaleLearnRateFactor, ..., OffsetL2Factor).
TRAINING_FACTORS = ("scale_learn_rate_factor", "offset_learn_rate_factor", "scale_l2_factor",
                    "offset_l2_factor")


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
    backward = plan_backward(plan) if plan.layer.training else None
    comment = kernel_comment(plan, kernel) + (backward_lines(backward, plan) if backward else ())
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
        factor_literals={k: dt.literal(getattr(plan.layer, k)) for k in TRAINING_FACTORS},
        backward=backward,
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
