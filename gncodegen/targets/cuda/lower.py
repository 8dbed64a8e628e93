"""CUDA lowering: launch geometry, strategies and index arithmetic for one layer.

Pure functions from a Plan to everything the CUDA templates print. The
decisions live here and are asserted here: how many threads own one (observation, group)
("a team"), whether the team is part of a warp, a block or a thread-block cluster, how many
elements each thread keeps in registers, the vector width of the loads, and which kernel the
host code launches for which device and batch.

Strategies
  warp     a group of at most 32 * on-chip elements is owned by 2..32 lanes of a warp; a block
           holds several teams; reductions are warp shuffles only.
  block    one block owns a group and keeps it in registers (read once, written once).
  cluster  a group is split across the blocks of a thread-block cluster (sm_90): every block
           keeps its share in registers, partial sums meet in distributed shared memory and
           every block adds them in rank order, so the result is deterministic and no atomics
           are used.
  looped   a group too large for one cluster's registers: the team sweeps global memory twice
           (statistics, then apply; the second sweep mostly hits L2).
  split    stands in for a looped kernel whose teams would leave SMs idle (fewer than two
           blocks per SM; always so on sm_80 for large groups of small batches): every group is
           cut into chunks of `threads * vec * items` elements, each its own block. A first
           kernel writes each chunk's sums (and the group's pilot) to stream-ordered memory
           from a pool the layer keeps; a second one, launched behind it on the stream, has every block add
           its group's chunk sums in the same fixed order and apply to its chunk, whose second
           read mostly hits L2. Where the workspace cannot be had, the looped kernel runs.
           Looped rows teams get it too, one group per chunk with the group's own vectors.
  rows     channels-last with groups narrower than a memory sector: one team (block or cluster,
           on chip or looped as above) owns several neighbouring groups, so every load is a
           full row of contiguous channels; each thread always sees the same channels and
           keeps one pair of sums per group its vector touches.

Overflow rescue. The sums are of d = x - pilot; when a group's |x| is large enough
for the sum of d*d to overflow the accumulation type (|x| beyond ~1e19 / sqrt(N) in float),
the team sums the group again with d = x*2^-e - pilot*2^-e, which is exact, and undoes the
scaling in the statistics (`Rescue`). The rescue is a rare branch taken by whole teams (by
whole warps for the warp kernel, whole blocks via __syncthreads_or for rows teams): on chip
kernels sum again from their registers, looped ones read the group once more. NaN and Inf
also take it and stay in the sums, so they reach their group as in the reference. half never
needs it (65504^2 times any group size fits a float), nor do groups of one element (d = 0).
Limit: |x| up to half the largest value of the storage type (x - pilot must stay finite).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ...dtypes import DTYPES, c_literal, c_literals
from ...plan import Plan
from ...text import counted
from ..base import TargetRecord
from ..cfamily import Style
from .dispatch import (FEW_BLOCKS, MISALIGNED, SM90, DispatchEnv, Rule, dispatch_rules,
                       evaluate)
from .options import CUDA_ARCH
from .geometry import (AB_SMEM_BYTES, CONSTANT_PARAM_BYTES, GRID_LIMIT, MIN_WAVES, POOL_DEVICES, SIZE_MAX, SPLIT_RECORD,
                       WARP, CudaOptions, OffsetTerm, Rows, Variant, _channel_index,
                       choose_variants, offset_terms)

# The largest offset an int holds; the index within a group stays an int (GROUP_LIMIT).
INT_MAX = 2**31 - 1
# Elements of a group the kernels index with an int: room left for a loop's last step.
GROUP_LIMIT = 2**31 - 2**26


@dataclass(frozen=True)
class CudaScalar:
    """How one dtype is spelled in CUDA: storage type and its conversions."""

    dtype: str
    elem: str          # storage type
    acc: str           # accumulation type
    to_acc: str        # function from elem to acc ('' for none)
    from_acc: str      # function from acc to elem ('' for none)
    header: str        # extra CUDA header, '' for none
    bytes: int
    bits: str = ""     # function from a 16-bit elem to its unsigned short bits


def _scalar(dtype: str, elem: str, to_acc: str = "", from_acc: str = "", header: str = "",
            bits: str = "") -> CudaScalar:
    dt = DTYPES[dtype]
    return CudaScalar(dtype, elem, dt.spelling.ctype, to_acc, from_acc, header, dt.bytes, bits)


CUDA_SCALARS = {
    "single": _scalar("single", "float"),
    "double": _scalar("double", "double"),
    "half": _scalar("half", "__half", "__half2float", "__float2half_rn", "cuda_fp16.h",
                    "__half_as_ushort"),
    "bfloat16": _scalar("bfloat16", "__nv_bfloat16", "__bfloat162float", "__float2bfloat16_rn",
                        "cuda_bf16.h", "__bfloat16_as_ushort"),
}



@dataclass(frozen=True)
class CudaPlan(TargetRecord):
    """Everything the CUDA templates print for one layer: the CUDA target's record."""

    plan: Plan
    scalar: CudaScalar
    archs: tuple[int, ...]
    vec: int                          # widest legal vector (elements)
    offset_terms: tuple[OffsetTerm, ...]
    offset_type: str                  # int, or size_t when a stride depends on the batch or
                                      # an observation spans more than INT_MAX elements
    channel_div: int                  # channel of flat index i: (i / div) % cpg
    channel_mod: int | None
    group_stride: int                 # elements between group g and g+1 of one observation
    group_stride_per_batch: bool
    batch_stride: int
    max_batch: int
    variants: tuple[Variant, ...]
    warp: Variant | None
    narrow: Variant | None            # sm_90, enough blocks: smallest cluster that fits
    wide: Variant | None              # sm_90, few groups: split each group further
    portable: Variant | None          # any arch: one block per group
    split: Variant | None             # any arch: chunks of a group in independent blocks
    scalar_variant: Variant           # unaligned pointers
    min_blocks_per_sm: int
    ab_in_smem: bool                  # stage folded a/b per channel in shared memory
    rows: Rows | None                 # channels-last teams of several groups
    rescue: Rescue | None             # sums again, scaled, when the squares overflow
    uses_cluster: bool
    epsilon_literal: str
    inv_numel_literal: str
    scale_literals: tuple[str, ...]
    offset_literals: tuple[str, ...]
    params_in_constant: bool          # baked parameters in __constant__ memory (else global)
    style: Style                      # how the shared numerics are spelled here
    dispatch: tuple[Rule, ...]        # the host code's launch rules, in order
    device_query_at: int              # the first rule that needs the device's attributes
    summary: tuple[str, ...]
    max_grid: int = GRID_LIMIT        # training: blocks one generic launch may have
    train_threads: int = 256          # training: threads of a generic block (TRAIN_THREADS)

    @property
    def params_space(self) -> str:
        """Where the baked parameters live: __constant__, or __device__ (global) memory."""
        return "__constant__" if self.params_in_constant else "__device__"

    @property
    def needs_major(self) -> bool:
        """Whether a launch rule reads the device's compute capability."""
        return any(c.kind == SM90 for r in self.dispatch for c in r.when)

    @property
    def needs_sms(self) -> bool:
        """Whether a launch rule reads the device's SM count."""
        return any(c.kind == FEW_BLOCKS for r in self.dispatch for c in r.when)

    @property
    def group_numel(self) -> int:
        """Elements in one (observation, group)."""
        return self.plan.group_numel

    @property
    def pilot_indices(self) -> tuple[int, int, int]:
        """Flat in-group indices of the pilot candidates: first, middle and last element."""
        n = self.plan.group_numel
        return (0, n // 2, n - 1)

    @property
    def split_record(self) -> int:
        """Accumulators in one split chunk record."""
        return SPLIT_RECORD

    @property
    def pool_devices(self) -> int:
        """Devices the split workspace pools are kept for."""
        return POOL_DEVICES

    @property
    def split_bytes_per_group(self) -> int:
        """Workspace bytes the split kernels take per (observation, group); 0 without them."""
        if self.split is None:
            return 0
        return self.split.chunks * SPLIT_RECORD * (8 if self.scalar.acc == "double" else 4)



@dataclass(frozen=True)
class Rescue:
    """Statistics summed again with d scaled by 2^-exponent when the sum of squares overflows."""

    exponent: int
    unit_literal: str      # 2^-exponent in the accumulation type
    epsilon_literal: str   # epsilon * 2^(-2*exponent) (0 below the normal range)

    @property
    def unit_text(self) -> str:
        """The scaling in words, for comments."""
        return f"2^-{self.exponent}"


def rescue_plan(numel: int, dtype: str, acc: str, epsilon: float) -> Rescue | None:
    """Return the rescue of a group of numel elements, or None when its squares cannot overflow.

    |d| = |x - pilot| <= 2 * the largest element, so numel squares of d*2^-e stay below half the
    largest accumulator when 2e >= log2(8 * largest^2 * numel / acc_largest); the smallest
    overflowed sum, acc_largest, scaled by 2^-2e must stay a normal number with bits to spare.
    """
    if numel == 1:
        return None                        # d = x - x = 0: nothing to overflow
    m, a = DTYPES[dtype].largest, DTYPES[DTYPES[dtype].acc].largest
    need = 3 + 2 * math.log2(m) + math.log2(numel) - math.log2(a)
    if need <= 0:
        return None                        # e.g. half: every sum of squares fits a float
    e = math.ceil(need / 2)
    tiny = float(np.finfo(np.float32 if acc == "float" else np.float64).tiny)
    assert math.log2(a) - 2 * e >= math.log2(tiny) + 64, (numel, dtype, e)
    kind = "double" if acc == "double" else "single"
    # epsilon in the scaled units, 0 below the normal range: epsilon is then under 2^(2e)
    # times the smallest normal (>= 64), nothing next to a variance whose squares overflowed.
    scaled_eps = epsilon * 2.0 ** (-2 * e)
    if scaled_eps < tiny:
        scaled_eps = 0.0
    return Rescue(e, DTYPES[kind].pow2_literal(-e), c_literal(scaled_eps, kind))



def lower_cuda(plan: Plan, options: CudaOptions | None = None) -> CudaPlan | CudaRuntimePlan:
    """Return the CudaPlan for one layer (a CudaRuntimePlan where its sizes are given at run
    time)."""
    if plan.runtime_sizes:
        return lower_cuda_runtime(plan)
    opts = options or CudaOptions()
    layer = plan.layer
    sc = CUDA_SCALARS[layer.dtype]
    numel = plan.group_numel
    archs = CUDA_ARCH.value(layer)
    chosen = choose_variants(plan, sc.bytes, sc.acc == "double", archs, opts)
    vec, rows, variants = chosen.vec, chosen.rows, chosen.all
    warp, narrow, wide, portable, split, scalar = (chosen.warp, chosen.narrow, chosen.wide,
                                                   chosen.portable, chosen.split, chosen.scalar)
    lay = plan.layout
    group_stride = plan.channels_per_group * lay.channel_stride
    max_teams_per_group = max(v.blocks_per_group for v in variants)
    if plan.has_batch:
        max_batch = min(GRID_LIMIT // (plan.num_groups * max_teams_per_group),
                        SIZE_MAX // plan.observation_numel)
    else:
        max_batch = 1
    assert max_batch >= 1
    div, mod = _channel_index(plan)
    per_batch = any(t.per_batch for t in offset_terms(plan))
    block_variants = [v for v in variants if v.strategy != "warp"]
    ab_bytes = plan.channels_per_group * 2 * (8 if sc.acc == "double" else 4)
    ab_in_smem = bool(block_variants) and plan.channels_per_group > 1 and ab_bytes <= AB_SMEM_BYTES
    if rows is not None:
        assert all(v.threads % rows.row_threads == 0 for v in variants if v.team_groups > 1)
        assert rows.width * 2 * (8 if sc.acc == "double" else 4) <= AB_SMEM_BYTES

    acc = "double" if sc.acc == "double" else "single"
    sc_acc_bytes = DTYPES[acc].bytes
    rescue = rescue_plan(numel, layer.dtype, sc.acc, layer.epsilon)
    # A looped variant launched with too few blocks to fill the SMs gives way to the split
    # kernels, where the layer has them: it would sweep each group twice, alone.
    rules = dispatch_rules(chosen, lambda v: split is not None and v.strategy == "looped")
    lines = list(plan.summary[:6])
    lines.append(f"CUDA: {sc.elem} in memory, {sc.acc} accumulation; loads of {vec} "
                 f"element{'s' if vec > 1 else ''}; archs {', '.join(f'sm_{a}' for a in archs)}")
    if rows is not None:
        lines.append(f"rows: a team owns {rows.groups} neighbouring groups, {rows.positions} rows "
                     f"of {rows.width} contiguous channels read by {rows.row_threads} threads "
                     f"with loads of {rows.vec}")
    if rescue is not None:
        lines.append(f"overflow rescue: a group whose sum of squares overflows {sc.acc} is "
                     f"summed again with d scaled by {rescue.unit_text}")
    for v in variants:
        where = "sm_90+" if v.needs_sm90 else "any arch"
        if v.strategy == "split":
            lines.append(f"kernel {v.name} ({where}): two kernels of {v.threads}-thread blocks, "
                         f"{v.chunks} blocks per group, {v.elements_per_thread} elements per "
                         f"thread: {v.why}")
            continue
        lines.append(f"kernel {v.name} ({where}): {v.strategy}, {v.threads} threads"
                     + (f" x {v.cluster}-block cluster" if v.cluster > 1 else "")
                     + (f", {v.teams_per_block} groups per block" if v.teams_per_block > 1 else "")
                     + (f", {counted(v.elements_per_thread, 'element')} per thread in registers"
                        if v.items else ", two sweeps over memory")
                     + f": {v.why}")
    lines.append("launch rules, in order (the first that holds picks the kernel):")
    lines.extend(f"  {rule_text(r)}" for r in rules)
    lines.extend(training_lines(layer))
    return CudaPlan(
        plan=plan, scalar=sc, archs=archs, vec=vec, offset_terms=offset_terms(plan),
        offset_type="size_t" if per_batch or plan.observation_numel > INT_MAX else "int",
        channel_div=div, channel_mod=mod, group_stride=group_stride,
        group_stride_per_batch=lay.channel_per_batch, batch_stride=lay.batch_stride,
        max_batch=max_batch, variants=variants, warp=warp, narrow=narrow, wide=wide,
        portable=portable, split=split, scalar_variant=scalar, min_blocks_per_sm=MIN_WAVES,
        ab_in_smem=ab_in_smem, rows=rows, rescue=rescue,
        uses_cluster=any(v.cluster > 1 for v in variants),
        epsilon_literal=c_literal(layer.epsilon, acc),
        inv_numel_literal=c_literal(1.0 / numel, acc),
        scale_literals=c_literals(plan.scale_values, acc),
        offset_literals=c_literals(plan.offset_values, acc),
        params_in_constant=2 * plan.num_channels * sc_acc_bytes <= CONSTANT_PARAM_BYTES,
        style=Style("__device__ __forceinline__", DTYPES[acc].spelling, "acc_t", "group_stats",
                    "finish", "split_mean", "kInvGroupNumel", "kEpsilon", cpp=True),
        dispatch=rules,
        device_query_at=next((i for i, r in enumerate(rules)
                              if any(c.kind != MISALIGNED for c in r.when)), len(rules)),
        summary=tuple(lines),
    )


def rule_text(rule: Rule) -> str:
    """Return one launch rule in words, for the plan comment and `gncodegen show`."""
    words = {MISALIGNED: lambda c: "x or y not vector-aligned",
             SM90: lambda c: "compute capability 9+",
             FEW_BLOCKS: lambda c: (f"teams{f' / {c.team_groups}' if c.team_groups > 1 else ''}"
                                    f"{f' * {c.cluster}' if c.cluster > 1 else ''} < "
                                    "SMs * 2")}
    when = " and ".join(words[c.kind](c) for c in rule.when) or "otherwise"
    ws = ", when the workspace can be had" if rule.workspace else ""
    return f"{rule.variant.name}: {when}{ws}"


def chosen_variant(cp: CudaPlan, batch: int, cc_major: int, sms: int,
                   aligned: bool = True, pool: bool = True) -> Variant:
    """Return the variant the generated host code launches: its launch rules, evaluated.

    pool: whether the split kernels' workspace can be had.
    """
    env = DispatchEnv(batch * cp.plan.num_groups, cc_major, sms * cp.min_blocks_per_sm,
                      aligned, pool)
    return evaluate(cp.dispatch, env)


# --------------------------------------------------------------------------- runtime sizes

# A layer whose sizes are given at run time runs one kernel: a block of RUNTIME_THREADS
# threads per (observation, group), looping over the group with the index arithmetic of the
# call's shape (computed on the host from the sizes), loads of one element.
RUNTIME_THREADS = 256
# A training layer's forward_train and backward run generic kernels, one block of
# TRAIN_THREADS per (observation, group) (backward's parameter sums: per channel), on the
# call's shape as a runtime-size layer's kernel takes it; the solvers one thread a channel.
TRAIN_THREADS = RUNTIME_THREADS


def training_lines(layer) -> list[str]:
    """Return the plan comment's words on a training layer's kernels (none otherwise)."""
    if not layer.training:
        return []
    return [f"training: forward_train runs runtime_group_kernel ({TRAIN_THREADS} threads a "
            "(observation, group)) saving mean and rstd; backward runs backward_params_kernel "
            "(a block a channel, the observations in order: no atomics) then "
            "backward_dx_kernel (a block a group); the updates a thread a channel"]


@dataclass(frozen=True)
class CudaRuntimePlan(TargetRecord):
    """The CUDA target's record of a layer with sizes given at run time: what runtime.cu.j2
    prints. The group's loops keep their order; the host turns the sizes into each loop's
    extent, divisor and stride for the call."""

    plan: Plan
    scalar: CudaScalar
    archs: tuple[int, ...]
    threads: int
    rescue: Rescue | None
    epsilon_literal: str
    scale_literals: tuple[str, ...]
    offset_literals: tuple[str, ...]
    params_in_constant: bool
    style: Style
    summary: tuple[str, ...]
    max_grid: int = GRID_LIMIT        # blocks one launch may have (batch * groups)
    split: None = None                # no split kernels (the header says so by this)
    train_threads: int = 256          # training: threads of a block (TRAIN_THREADS)

    @property
    def params_space(self) -> str:
        """Where the baked parameters live: __constant__, or __device__ (global) memory."""
        return "__constant__" if self.params_in_constant else "__device__"

    @property
    def loops(self):
        """The loops of the group's nest, slowest first."""
        return self.plan.layout.group_loops


def lower_cuda_runtime(plan: Plan) -> CudaRuntimePlan:
    """Return the CUDA record of a layer with sizes given at run time."""
    layer = plan.layer
    sc = CUDA_SCALARS[layer.dtype]
    archs = CUDA_ARCH.value(layer)
    acc = "double" if sc.acc == "double" else "single"
    rescue = rescue_plan(max(2, plan.largest_group_numel), layer.dtype, sc.acc, layer.epsilon)
    lines = list(plan.summary[:6])
    lines.append(f"CUDA: {sc.elem} in memory, {sc.acc} accumulation; archs "
                 f"{', '.join(f'sm_{a}' for a in archs)}")
    lines.append(f"kernel runtime_group_kernel (any arch): a block of {RUNTIME_THREADS} threads "
                 "per (observation, group) loops over the group twice, its index arithmetic "
                 "from the call's sizes; loads of one element, compensated sums")
    if rescue is not None:
        lines.append(f"overflow rescue: a group whose sum of squares overflows {sc.acc} is "
                     f"summed again with d scaled by {rescue.unit_text}")
    lines.extend(training_lines(layer))
    return CudaRuntimePlan(
        plan=plan, scalar=sc, archs=archs, threads=RUNTIME_THREADS, rescue=rescue,
        epsilon_literal=c_literal(layer.epsilon, acc),
        scale_literals=c_literals(plan.scale_values, acc),
        offset_literals=c_literals(plan.offset_values, acc),
        params_in_constant=2 * plan.num_channels * DTYPES[acc].bytes <= CONSTANT_PARAM_BYTES,
        style=Style("__device__ __forceinline__", DTYPES[acc].spelling, "acc_t", "group_stats",
                    "finish", "split_mean", "inv_numel", "kEpsilon", inv_param=True),
        summary=tuple(lines))
