"""The C kernel's strategy: which loop shape the generated C uses, with its widths and arrays.

Every decision the fast C kernel depends on is made and asserted here, from the layout that
plan.analyze_layout found; the C templates only print it.

Kernel kinds (CKernel.kind):

- ``runs``: a group's statistics read contiguous runs (NCHW, NCT, feature input CB, ...). The
  sums go into `lanes` independent partial sums per run, so a compiler vectorizes them without
  reassociating float additions (no -ffast-math), then a fixed halving tree adds the lanes.
  The normalize sweep folds a and b per channel; when the channel is the fastest dimension
  (groups of single elements, or one group over channels-last data) it uses per-channel arrays.
- ``rows``: channels are fastest and a group is spread over many rows (NHWC, NTC, CBT). A block
  of whole groups is swept row by row with one accumulator per channel (an elementwise update
  that vectorizes across channels); the channel partials of each group are added at the end.
- ``strided``: anything else (a batch dimension faster than the channels, say): the portable
  nest of the baseline (two sweeps of sums, then the normalize sweep), correct for every layout.

Whatever the kind, a build that optimizes for size (``__OPTIMIZE_SIZE__``, i.e. -Os, the firmware
build) compiles the compact nest instead: one loop nest over the group swept three times (sums
around x[0], sums around that mean, then the normalize sweep), so the loop code exists once, and
the rescue below is a change of `unit` between sweeps, not a second loop. It meets the Cortex-M
budget (kernel text <= 400 bytes, stack <= 96 bytes for single precision; the
firmware tests assert it for every example and test shape) that the fast shapes' stack arrays
cannot. Its square root is the FPU's instruction where the core has one for the precision
(`fpu_sqrt`): at -Os gcc calls sqrtf for errno's sake, and that call alone cost the kernel 16 B
of stack and the caller-saved FPU registers.

Numerics shared by every shape: sums of d = x - pilot, the pilot being the mean of up
to PILOT_SAMPLES elements of the group along its longest loop (the closer the pilot is to the
mean, the less s2/N - shift^2 cancels: with the first element alone the variance lost up to
1e-6 relative on normal data, five times PyTorch's error). When the sum of squares overflows
while the input is finite (|x| beyond ~1e19 in single precision) the group is summed again
with d scaled by a power of two (`rescue_unit`), which is exact, and the statistics are scaled
back (the compact nest keeps d, shift and the variance in that unit and needs no undoing).
The fast apply is y = a*(x - mean) + b with the mean split into mean + mean_lo by two-sum and
b = offset - a*mean_lo; the compact and strided one y = a*((x - pilot) - shift) + offset, its
pilot the mean found by a first sweep (no loop of samples, which would break the Cortex-M4 text
budget). Limits: |x| up to FLT_MAX/2 in the fast kernels, FLT_MAX/N in the compact and strided
nests (their first sweep is unscaled); beyond, the group is NaN, never a wrong value.
Either way a mean of 1e4 with std 1 costs no accuracy (PyTorch loses 7e-4 there).
The fast kernels' pilot averages samples, so it can still land far from the mean when one of
them is an outlier (a group's first element 10*sqrt(N) std out: s2/N - shift^2 then lost 3e-5
relative in single over 65536 elements). When (mean - pilot)^2 > RECENTER_LIMIT * var
they sum the group once more, with the same lanes, around pilot + shift (`recenter`): a compare
per group on ordinary data, where the 16-sample pilot is within a fraction of a std.

Tiny groups (``simd_groups``, feature input such as 32 channels per group, no spatial extent). One
group at a time, the runs kernel spends its time on the latency of each group's own chain (a
horizontal add, a square root, a division) rather than on its 128 bytes. A build with AVX-512
(``__AVX512F__``, single precision) reduces SIMD_LANES groups together instead: each group's
elements are added down to one register, then a fixed tree of blends and two-source
permutes (`simd_tree`) adds 16 such registers into one whose lane k is group k's sum, so the
square roots and divisions of 16 groups are one instruction each. It takes two reductions: the
pilot is each group's mean (its elements times 1/N, added up), then the sums of d = x - pilot
and d^2 around it, which cancel nothing, so no recenter test is needed. A block whose sums are
not finite (overflowing squares, NaN or Inf input) has those groups done again by the portable
job, rescue and all. SIMD_BLOCKS blocks go through each phase together, so that the phases of
different blocks overlap; the jobs left over (fewer than a call's worth) and every other build
take the portable job.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ...fields import parse_int
from ...options import SpecOption
from ...plan import Layout, Loop, Plan

# Bytes of independent partial sums for each of the two sums: two AVX-512 registers, four
# AVX2 or eight SSE/NEON registers. Enough chains to hide the add latency on any of them.
LANE_BYTES = 128
# ... and at least this many lanes: gcc peels loops of up to 16 iterations completely and then
# vectorizes the straight-line code badly (16 double lanes ran 3x slower than 32).
MIN_LANES = 32
# The rows kernel sweeps blocks of whole groups of at most this many bytes of channels: the
# block's sums and pilots (3 x 512 bytes: 24 AVX-512 registers) stay in registers, where wider
# blocks spill them to the stack on every row (NTC 16x128x256 with 1 KiB blocks: 103 us, with
# 512 B: 78 us); one group wider than that still gets a block, up to ROW_BLOCK_MAX_BYTES.
ROW_BLOCK_BYTES = 512
ROW_BLOCK_MAX_BYTES = 1024
# Per-channel stack arrays of the runs kernel when channels are fastest (2 arrays).
CHANNEL_ARRAY_BYTES = 4096
# Elements of a group averaged into its pilot. Groups of at most SHORT_GROUP elements take fewer:
# their speed is the latency of one group's chain of dependent operations, which each sample
# lengthens (feature input, 32 per group: 16 samples made it 35% slower, 4 about 10%).
PILOT_SAMPLES = 16
SHORT_GROUP = 32
SHORT_GROUP_SAMPLES = 4
# Lane blocks per iteration of the statistics loop (a compiler hint): NCHW B 290 -> 245 us.
STATS_UNROLL = 8
# Long sums lose accuracy: a float accumulator that adds n terms of one sign loses up to about
# n/16 ulps in practice (32 lanes over a group of 2^20: 2.2e-4 relative). So every partial sum
# takes at most BLOCK_TERMS terms, then is folded into the group's total with Kahan's
# compensation (which loses nothing that matters however many blocks there are); one
# accumulator alone (the compact and strided nests, the rescue) is compensated once its group
# has more than PLAIN_TERMS elements, s1 as well as s2: s1 sums terms of one sign in a first
# sweep around a pilot far from the mean (an outlier as a group's first element), and a mean
# that sweep got 1% wrong (2^20 terms of -14481: each addition rounds the same way) leaves the
# second sweep's s2/N - shift^2 to cancel (0.16 relative error in y, measured).
BLOCK_TERMS = 64
PLAIN_TERMS = 1024
# Calls on fewer elements than this stay on one thread: starting a team costs microseconds.
PARALLEL_MIN_ELEMENTS = 1 << 16
# Upper bound on the fast shape's stack arrays, asserted for every plan.
MAX_STACK_BYTES = 16384
# The fast kernels sum a group again around its mean when (mean - pilot)^2 exceeds this many
# times the variance: s2/N - shift^2 then loses up to (1 + this) ulps of the variance.
# Never on ordinary data (a 16-sample pilot is within about a quarter std of the mean).
# Groups of at most SHORT_GROUP elements skip the test: it cost feature input (32 per group)
# 6%, and there the pilot is within sqrt(N - 1) std of the mean (it averages group elements),
# so the cancellation loses at most about N = 32 ulps of the variance (2e-6 in single).
RECENTER_LIMIT = 1.0
# The AVX-512 kernel for tiny groups (module docstring): groups reduced together (the float lanes
# of a register), the largest group it takes (eight registers: the runs kernel's 32 lanes keep
# larger groups busy enough), and the blocks of SIMD_LANES groups that one call sweeps
# phase by phase (E: 1 block 61 us, 2 or more 55 us; 4 keeps the call's 64 groups in L1).
SIMD_LANES = 16
SIMD_MAX_GROUP = 128
SIMD_BLOCKS = 4
# The compact nest's square root as one FPU instruction, by precision: the instruction and the
# bit of the ACLE's __ARM_FP that says the FPU has it (4: single precision). The argument,
# variance + epsilon, is never negative, so errno (why gcc -Os calls sqrtf) never matters.
# Double keeps sqrt(): no core built at -Os for double precision runs under the tests.
FPU_SQRT = {"single": ("vsqrt.f32", 4)}


MAX_THREADS = 256


def parse_threads(value, fld: str) -> int:
    """Return the OpenMP thread count a spec asks for (1 to MAX_THREADS)."""
    return parse_int(value, fld, minimum=1, maximum=MAX_THREADS)


THREADS = SpecOption("threads", ("Threads",), 1, parse_threads,
                     "OpenMP threads over observations and groups (with -fopenmp)")


@dataclass(frozen=True)
class CKernel:
    """How the generated C computes one layer, as the template prints it."""

    kind: str                       # "runs", "rows" or "strided" (module docstring)
    reason: str                     # one line for the plan comment
    lanes: int                      # independent partial sums per run (power of two)
    halvings: tuple[int, ...]       # lanes/2, lanes/4, ..., 1: the tree that adds the lanes
    threads: int                    # OpenMP threads over jobs (1: no pragma)
    parallel_min_elements: int      # a call on fewer elements runs on one thread
    stats_unroll: int               # lane blocks per iteration of the statistics loop (a hint)
    jobs_per_observation: int       # groups (runs, strided) or channel blocks (rows)
    rescue_unit_literal: str        # 2^-e: scaling of d in the rescue sums
    rescue_unit_text: str           # the same in words: 2^-80
    rescue_epsilon_literal: str     # epsilon * rescue_unit^2 (0 unless epsilon is huge)
    recenter: bool                  # fast kernels: test for a far pilot (groups > SHORT_GROUP)
    recenter_factor_literal: str    # fast kernels: sum again when shift^2 * it > s2/N
    fma: str                        # fast kernels: the fused multiply-add function
    fast_fma_macro: str             # ... and the <math.h> macro that says it is one instruction
    fpu_sqrt: str                   # compact nest: the Arm FPU's square root ("" for none)
    fpu_sqrt_flag: int              # the __ARM_FP bit that says the FPU has fpu_sqrt
    simd_groups: int                # groups per call of the AVX-512 tiny-group kernel (0: none)
    simd_vectors: int               # its registers per group
    simd_tree: tuple[tuple[int, str, tuple[int, ...]], ...]  # per level: pairs, blend mask, indices
    simd_order: tuple[int, ...]     # group k's register goes in at position simd_order[k]
    pilot_samples: int              # elements averaged into the pilot
    pilot_stride: str               # their distance in elements (a literal or a runtime stride)
    pilot_scale_literal: str        # 1 / pilot_samples
    group_stride: int               # elements between groups when they tile the buffer in job
                                    # order (group job = n*G + g starts at job*group_stride), else 0
    # runs kernel
    stats_outer: tuple[Loop, ...] = ()   # statistics loops outside the contiguous run
    stats_run: Loop | None = None        # the contiguous run (stride 1)
    stats_full: int = 0                  # elements of the run covered by whole lane blocks
    stats_remainder: int = 0             # elements left, added into lanes 0..remainder-1
    block_elements: int = 0              # lanes * BLOCK_TERMS: folded into the totals after
                                         # each block (0: the group is one block)
    blocks_in_run: int = 0               # whole blocks in one run (runs of a block or longer)
    runs_per_fold: int = 0               # runs per fold (runs shorter than a block)
    apply_outer: tuple[Loop, ...] = ()   # normalize loops outside the innermost one
    apply_run: Loop | None = None        # the innermost normalize loop (stride 1)
    channel_fastest: bool = False        # normalize with per-channel arrays a[], b[]
    # rows kernel
    row_loops: tuple[Loop, ...] = ()     # loops over the rows of a group (channel loop removed)
    block_groups: int = 0                # groups swept together
    block_channels: int = 0              # channels swept together (stack arrays' length)
    rows_per_fold: int = 0               # rows kernel: rows per fold (0: the group is one block)
    compensated: bool = False            # one-accumulator sums (compact, strided, rescue) use
                                         # Kahan's compensation for s1 and s2
    scale_guard: bool = False            # fast kernels: a scale above safe_scale can make
    safe_scale_literal: str = ""         # scale * rstd overflow; such calls take the portable
                                         # nest (the wide job) instead
    stack_bytes: int = 0                 # the fast shape's stack arrays, in bytes
    runtime: bool = False                # extents from sizes given at run time: the loops'
                                         # bounds, blocks and remainders are computed there
    pilot_count: str = ""                # runtime: the elements the pilot's loop has


def _pow2_floor(n: int) -> int:
    return 1 << (n.bit_length() - 1)


def _halvings(lanes: int) -> tuple[int, ...]:
    out = []
    h = lanes // 2
    while h >= 1:
        out.append(h)
        h //= 2
    return tuple(out)


def _group_stride(plan: Plan) -> int:
    """Return the distance between groups when group job n*G + g starts at job times it, else 0."""
    layout = plan.layout
    if layout.channel_per_batch:
        return 0
    stride = plan.channels_per_group * layout.channel_stride
    tiles = not plan.has_batch or layout.batch_stride == plan.num_groups * stride
    return stride if tiles else 0


def simd_tree(lanes: int) -> tuple[tuple[tuple[int, str, tuple[int, ...]], ...], tuple[int, ...]]:
    """Return the levels of the tree that adds `lanes` registers into one, and its input order.

    Each level adds `pairs` pairs of registers (a, b) as blend(a, b, mask) + permute2(a, b,
    index): the mask takes b's lanes in every other run of h/2 lanes (h: lanes per group so
    far), the index brings each lane's partner, h/2 lanes away, from the same register. A
    level halves both the registers and each group's lanes. Lane j of the last register then
    holds the group whose register went in at position bit-reverse(j); feeding group k at
    position bit-reverse(k) (the returned order) puts it in lane k.
    """
    levels = []
    h = pairs = lanes
    while h > 1:
        pairs //= 2
        half = h // 2
        from_b = [(j // half) % 2 for j in range(lanes)]
        mask = sum(1 << j for j in range(lanes) if from_b[j])
        index = tuple((j ^ half) + (lanes if from_b[j] else 0) for j in range(lanes))
        levels.append((pairs, f"0x{mask:0{lanes // 4}X}", index))
        h = half
    bits = lanes.bit_length() - 1
    order = tuple(int(f"{k:0{bits}b}"[::-1], 2) for k in range(lanes))
    return tuple(levels), order


def _simd_groups(plan: Plan, channel_fastest: bool, group_stride: int, outer: bool) -> int:
    """Return the groups per call of the AVX-512 tiny-group kernel for a runs plan, or 0.

    It takes single-precision groups that are one contiguous run of channels each (scale and
    offset are vectors along it), of a whole number of registers up to SIMD_MAX_GROUP
    elements, tiling the buffer in job order (a call's groups are one contiguous span).
    """
    n = plan.group_numel
    fits = (plan.dtype.name == "single" and channel_fastest and not outer
            and group_stride == n and n % SIMD_LANES == 0 and n <= SIMD_MAX_GROUP
            and not plan.layout.runtime_strides)
    return SIMD_LANES * SIMD_BLOCKS if fits else 0


def _block_groups(plan: Plan, threads: int) -> int:
    """Return how many groups the rows kernel sweeps together (0: none fits the stack arrays).

    The largest divisor of G whose channels fit ROW_BLOCK_BYTES per array, so that the block's
    accumulators stay in vector registers; one group when a group alone is wider, up to
    ROW_BLOCK_MAX_BYTES. With threads, at most G/threads, so that one observation alone still
    gives every thread a block, unless that leaves fewer than MIN_LANES channels per block.
    """
    g, cpg, size = plan.num_groups, plan.channels_per_group, plan.dtype.bytes
    fits = [k for k in range(1, g + 1) if g % k == 0 and k * cpg * size <= ROW_BLOCK_BYTES]
    if not fits:
        return 1 if cpg * size <= ROW_BLOCK_MAX_BYTES else 0
    shared = [k for k in fits if k <= g // threads and k * cpg >= MIN_LANES]
    return max(shared) if threads > 1 and shared else max(fits)


def plan_kernel(plan: Plan, threads: int | None = None) -> CKernel:
    """Return the CKernel for a plan: the fast shape its layout allows, widths and arrays.

    threads: OpenMP threads over the jobs (the spec's when not given).
    """
    threads = THREADS.value(plan.layer) if threads is None else threads
    layout: Layout = plan.layout
    dt = plan.dtype
    dtype = dt.name
    size = dt.bytes
    max_lanes = max(LANE_BYTES // size, MIN_LANES)
    if plan.runtime_sizes:
        return _runtime_kernel(plan, threads)
    rescue = dt.rescue_exponent_for(plan.group_numel)
    common = dict(
        threads=threads, parallel_min_elements=PARALLEL_MIN_ELEMENTS, stats_unroll=STATS_UNROLL,
        # decimal, not 0x1p-80f: the source also compiles as C++11, which has no hex floats
        rescue_unit_literal=dt.literal(2.0 ** -rescue),
        rescue_unit_text=f"2^-{rescue}",
        rescue_epsilon_literal=dt.literal(float(dt.round(plan.layer.epsilon * 2.0 ** (-2 * rescue)))),
        recenter=plan.group_numel > SHORT_GROUP,
        # shift^2 > limit * (s2/N - shift^2)  <=>  shift^2 * (1 + limit) / limit > s2/N
        recenter_factor_literal=dt.literal((1.0 + RECENTER_LIMIT) / RECENTER_LIMIT),
        fpu_sqrt=FPU_SQRT.get(dtype, ("", 0))[0], fpu_sqrt_flag=FPU_SQRT.get(dtype, ("", 0))[1],
        fma=dt.spelling.fma, fast_fma_macro=dt.spelling.fast_fma_macro,
        compensated=plan.group_numel > PLAIN_TERMS,
    )
    cpg = plan.channels_per_group
    stats, group = layout.stats_loops, layout.group_loops
    # The pilot samples the longest loop of the group (the innermost on a tie), from its start.
    along = max(reversed(stats), key=lambda lp: lp.extent) if stats else None
    samples = min(along.extent, PILOT_SAMPLES) if along else 1
    if plan.group_numel <= SHORT_GROUP:
        samples = min(samples, SHORT_GROUP_SAMPLES)
    common.update(pilot_samples=samples,
                  pilot_stride=along.stride_expr if along else "1",
                  pilot_scale_literal=dt.literal(1.0 / samples),
                  group_stride=_group_stride(plan))
    tree, order = simd_tree(SIMD_LANES)
    common.update(simd_groups=0, simd_vectors=0, simd_tree=tree, simd_order=order)
    innermost_contiguous = bool(stats) and stats[-1].stride == 1 and not stats[-1].per_batch
    # Per-channel arrays a[], b[] where channels are fastest; one channel needs none.
    channel_fastest = bool(group) and group[-1].is_channel and cpg > 1

    if innermost_contiguous and (not channel_fastest or cpg * size <= CHANNEL_ARRAY_BYTES) \
            and (layout.group_contiguous or not layout.channels_last):
        run, apply_run = stats[-1], group[-1]
        assert apply_run.stride == 1 and not apply_run.per_batch, apply_run
        lanes = min(max_lanes, _pow2_floor(run.extent))
        block = lanes * BLOCK_TERMS if plan.group_numel > lanes * BLOCK_TERMS else 0
        full = run.extent // lanes * lanes
        in_run = full // block if block else 0
        per_fold = block // run.extent if block and not in_run and stats[:-1] else 0
        stack = ((6 if block else 2) * lanes * size
                 + (2 * cpg * size if channel_fastest else 0))
        simd = _simd_groups(plan, channel_fastest, common["group_stride"],
                            bool(stats[:-1] or group[:-1]))
        if simd and not plan.layer.fused:   # the AVX-512 path stores plain y of plain x
            common.update(simd_groups=simd, simd_vectors=plan.group_numel // SIMD_LANES)
        kernel = CKernel(
            kind="runs",
            reason=(f"runs kernel: {lanes} partial sums per contiguous run of {run.extent}; "
                    + ("per-channel a[], b[] (channels fastest)" if channel_fastest
                       else "a and b folded per channel")),
            lanes=lanes, halvings=_halvings(lanes), jobs_per_observation=plan.num_groups,
            stats_outer=tuple(stats[:-1]), stats_run=run,
            stats_full=full, stats_remainder=run.extent % lanes,
            block_elements=block, blocks_in_run=in_run, runs_per_fold=per_fold,
            apply_outer=tuple(group[:-1]), apply_run=apply_run,
            channel_fastest=channel_fastest, stack_bytes=stack, **common)
    elif layout.channels_last and (bk := _block_groups(plan, threads)):
        block_channels = bk * cpg
        rows = tuple(lp for lp in group if not lp.is_channel)
        folded = plan.group_numel // cpg > BLOCK_TERMS   # a channel's rows exceed one block
        assert group[-1].is_channel and group[-1].stride == 1
        kernel = CKernel(
            kind="rows",
            reason=(f"rows kernel: {bk} group{'s' if bk > 1 else ''} ({block_channels} "
                    f"channels) swept row by row with one accumulator per channel"),
            lanes=1, halvings=(), jobs_per_observation=plan.num_groups // bk,
            row_loops=rows, block_groups=bk, block_channels=block_channels,
            rows_per_fold=BLOCK_TERMS if folded else 0,
            stack_bytes=(10 if folded else 6) * block_channels * size, **common)
    else:
        kernel = CKernel(
            kind="strided", reason="strided kernel: the portable nest (no contiguous run)",
            lanes=1, halvings=(), jobs_per_observation=plan.num_groups, **common)

    if kernel.kind != "strided":
        safe = safe_scale(plan)
        # A modulated layer folds each observation's gain into a too: always checked.
        if safe < dt.accumulator.largest or plan.layer.adaptive:
            safe = min(safe, dt.accumulator.largest)
            kernel = replace(kernel, scale_guard=True, safe_scale_literal=dt.literal(safe))
    assert kernel.stack_bytes <= MAX_STACK_BYTES, kernel
    assert kernel.lanes & (kernel.lanes - 1) == 0
    assert kernel.jobs_per_observation * (kernel.block_groups or 1) == plan.num_groups
    if kernel.simd_groups:
        assert kernel.kind == "runs" and kernel.simd_vectors * SIMD_LANES == plan.group_numel
        assert kernel.simd_groups % SIMD_LANES == 0
    if kernel.kind == "runs":
        assert kernel.stats_full + kernel.stats_remainder == kernel.stats_run.extent
        assert kernel.stats_remainder < kernel.lanes
        if kernel.block_elements:
            assert (kernel.blocks_in_run > 0) + (kernel.runs_per_fold > 0) == 1, kernel
    return kernel


def _runtime_kernel(plan: Plan, threads: int) -> CKernel:
    """Return the kernel of a layer with sizes known only at run time, by the rules of the
    fixed sizes as far as they do not depend on the sizes: the runs kernel where the group's
    statistics read contiguous runs (its blocks, lane steps and remainder counted at run
    time, every block folded), else the portable nest; the compact nest at -Os. Sums are
    compensated and the rescue scaled for the largest group the bounds allow."""
    dt = plan.dtype
    layout = plan.layout
    size = dt.bytes
    cpg = plan.channels_per_group
    rescue = dt.rescue_exponent_for(plan.largest_group_numel)
    stats, group = layout.stats_loops, layout.group_loops
    common = dict(
        threads=threads, parallel_min_elements=PARALLEL_MIN_ELEMENTS, stats_unroll=STATS_UNROLL,
        rescue_unit_literal=dt.literal(2.0 ** -rescue), rescue_unit_text=f"2^-{rescue}",
        rescue_epsilon_literal=dt.literal(float(dt.round(plan.layer.epsilon
                                                         * 2.0 ** (-2 * rescue)))),
        recenter=True, recenter_factor_literal=dt.literal((1.0 + RECENTER_LIMIT)
                                                          / RECENTER_LIMIT),
        fpu_sqrt=FPU_SQRT.get(dt.name, ("", 0))[0],
        fpu_sqrt_flag=FPU_SQRT.get(dt.name, ("", 0))[1],
        fma=dt.spelling.fma, fast_fma_macro=dt.spelling.fast_fma_macro,
        compensated=True, pilot_samples=PILOT_SAMPLES, pilot_scale_literal="",
        group_stride=0, simd_groups=0, simd_vectors=0, simd_tree=(), simd_order=(),
        runtime=True)
    innermost_contiguous = bool(stats) and stats[-1].stride == 1 and not stats[-1].runtime_stride
    channel_fastest = bool(group) and group[-1].is_channel and cpg > 1
    if innermost_contiguous and (not channel_fastest or cpg * size <= CHANNEL_ARRAY_BYTES) \
            and (layout.group_contiguous or not layout.channels_last):
        run, apply_run = stats[-1], group[-1]
        lanes = max(LANE_BYTES // size, MIN_LANES)
        kernel = CKernel(
            kind="runs",
            reason=(f"runs kernel: {lanes} partial sums per contiguous run of "
                    f"{run.extent_expr} (sizes at run time), folded every "
                    f"{lanes * BLOCK_TERMS} elements; "
                    + ("per-channel a[], b[] (channels fastest)" if channel_fastest
                       else "a and b folded per channel")),
            lanes=lanes, halvings=_halvings(lanes), jobs_per_observation=plan.num_groups,
            stats_outer=tuple(stats[:-1]), stats_run=run, block_elements=lanes * BLOCK_TERMS,
            apply_outer=tuple(group[:-1]), apply_run=apply_run,
            channel_fastest=channel_fastest,
            stack_bytes=6 * lanes * size + (2 * cpg * size if channel_fastest else 0),
            pilot_stride=run.stride_expr, pilot_count=run.extent_expr, **common)
    elif layout.channels_last and (bk := _block_groups(plan, threads)):
        rows = tuple(lp for lp in group if not lp.is_channel)
        along = rows[-1]
        kernel = CKernel(
            kind="rows",
            reason=(f"rows kernel: {bk} group{'s' if bk > 1 else ''} ({bk * cpg} channels) "
                    "swept row by row with one accumulator per channel (rows at run time, "
                    f"folded every {BLOCK_TERMS})"),
            lanes=1, halvings=(), jobs_per_observation=plan.num_groups // bk,
            row_loops=rows, block_groups=bk, block_channels=bk * cpg,
            rows_per_fold=BLOCK_TERMS, stack_bytes=10 * bk * cpg * size,
            pilot_stride=along.stride_expr, pilot_count=along.extent_expr, **common)
    else:
        kernel = None
    if kernel is not None:
        safe = safe_scale(plan)
        # A modulated layer folds each observation's gain into a too: always checked.
        if safe < dt.accumulator.largest or plan.layer.adaptive:
            safe = min(safe, dt.accumulator.largest)
            kernel = replace(kernel, scale_guard=True, safe_scale_literal=dt.literal(safe))
        assert kernel.stack_bytes <= MAX_STACK_BYTES, kernel
        return kernel
    return CKernel(
        kind="strided",
        reason="strided kernel: the portable nest over the sizes given at run time",
        lanes=1, halvings=(), jobs_per_observation=plan.num_groups, pilot_stride="1", **common)


def safe_scale(plan: Plan) -> float:
    """Return the largest |scale| whose a = scale * rstd cannot overflow the accumulation type.

    rstd = 1/sqrt(var + epsilon) is at most 1/sqrt(epsilon), as the code rounds it; the bound
    keeps a margin below the quotient and is rounded down into the type.
    """
    acc = plan.dtype.accumulator
    ftype = acc.numpy.type
    max_rstd = float(ftype(1.0) / ftype(np.sqrt(ftype(plan.layer.epsilon))))
    bound = acc.largest / max_rstd * (1.0 - 2.0 ** -20)
    if bound >= acc.largest:
        return acc.largest
    return float(np.nextafter(ftype(bound), ftype(0.0)))


def kernel_comment(plan: Plan, k: CKernel) -> tuple[str, ...]:
    """Return the lines of the C header's "C kernel" comment: how this kernel computes."""
    threads = (f"OpenMP over {k.threads} threads when built with -fopenmp (calls of at least "
               f"{k.parallel_min_elements} elements)" if k.threads > 1 else "one thread")
    sqrt = f"; {k.fpu_sqrt} for the square root on an Arm FPU" if k.fpu_sqrt else ""
    pilot = (f"the mean of {k.pilot_samples} elements of the group" if k.pilot_samples > 1
             else "the group's first element")
    overflow = "1e19" if plan.dtype.name == "single" else "1e154"
    simd = ((f"an AVX-512 build (__AVX512F__) takes {k.simd_groups} groups per call, "
             f"{len(k.simd_order)} reduced together",
             "in register lanes, around each group's mean; the rest as below")
            if k.simd_groups else ())
    return (
        k.reason,
        *simd,
        threads,
        "a build for size (-Os, __OPTIMIZE_SIZE__) compiles the compact nest instead: one loop",
        f"nest swept three times (two sums, then apply){sqrt}",
        f"pilot: {pilot}; sums of d = x - pilot and d^2 (compact:",
        "two sweeps, the second around the mean the first found)",
        "apply: y = a*(x - mean) + b, a = scale*rstd, b = offset - a*mean_lo, with mean + mean_lo",
        "= pilot + shift exactly (two-sum); compact: y = a*((x - pilot) - shift) + offset",
        f"fast kernels fuse d*d + s2 and the apply's multiply-add ({k.fma}) where the target "
        "has it",
        f"squares that overflow (|x| beyond ~{overflow}) are summed again scaled by "
        f"{k.rescue_unit_text} (exact);",
        f"limit: |x| up to half the largest value (compact: the largest value / "
        f"{plan.group_numel_expr}), else NaN",
    )
