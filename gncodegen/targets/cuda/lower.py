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

from ...dtypes import DTYPES, c_literal
from ...errors import TargetUnavailable
from ...plan import Plan
from ..base import TargetRecord

WARP = 32
MAX_CLUSTER = 8            # the portable cluster size limit
VECTOR_BYTES = 16          # one 128-bit load or store per thread per step
ONCHIP_BYTES = 64          # input bytes a thread keeps in registers (16 floats)
ONCHIP_ELEMENTS = 32       # ... and at most this many elements (32 halves)
BLOCK_THREADS = (256, 512, 1024)
# A thread of a 1024-thread block has 64 registers. Keeping 8 doubles (16 registers) plus the
# double sums, pilot and addresses spills there (ptxas, sm_80 and sm_90), so double-precision
# teams that hold their group on chip use blocks of at most this many threads.
DOUBLE_ONCHIP_THREADS = 512
WARP_TEAM_BLOCK = 256      # threads per block for the warp strategy
GRID_LIMIT = 2**31 - 1
SIZE_MAX = 2**64 - 1
AB_SMEM_BYTES = 16 * 1024  # folded a/b per channel staged in shared memory up to this size
MIN_WAVES = 2              # the wide (or split) variant is used below this many blocks per SM
SPLIT_RECORD = 4           # accumulators per split chunk record: s1, s2, scaled, pilot
POOL_DEVICES = 64          # devices that can get the layer's split workspace pool
# Splitting a team over a cluster costs ~2-3 us of synchronisation on an H100 (measured with
# benchmarks/bench_cuda.py --cluster-sweep): worth it only for teams this large.
WIDE_MIN_NUMEL = 8192


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
class CudaOptions:
    """Knobs of the geometry; the defaults are the real ones, tests shrink them to emulate."""

    block_threads: tuple[int, ...] = BLOCK_THREADS
    warp_team_block: int = WARP_TEAM_BLOCK
    onchip_bytes: int = ONCHIP_BYTES
    onchip_elements: int = ONCHIP_ELEMENTS
    max_cluster: int = MAX_CLUSTER
    wide_min_numel: int = WIDE_MIN_NUMEL


@dataclass(frozen=True)
class Variant:
    """One kernel instantiation and its launch geometry."""

    name: str          # role: warp, narrow, wide, portable, scalar
    strategy: str      # warp, block, cluster, looped
    threads: int       # threads per block
    lanes: int         # threads per team (warp strategy: lanes per group; else threads*cluster)
    cluster: int       # blocks per group
    vec: int           # elements per load
    items: int         # vectors per thread kept in registers (0: looped)
    teams_per_block: int
    needs_sm90: bool
    why: str
    team_groups: int = 1   # consecutive groups one team owns (rows strategy: several)
    chunks: int = 1        # split strategy: blocks (chunks) per group

    @property
    def blocks_per_group(self) -> int:
        """Blocks that one (observation, group) occupies."""
        return self.cluster * self.chunks

    @property
    def chunk_numel(self) -> int:
        """Split strategy: elements of one chunk (one block)."""
        return self.threads * self.vec * self.items

    @property
    def template_args(self) -> str:
        """The kernel's template arguments, without the trailing BAKED flag."""
        if self.strategy in ("warp", "split"):
            return f"{self.lanes}, {self.vec}, {self.items}"
        return f"{self.threads}, {self.cluster}, {self.vec}, {self.items}"

    @property
    def kernel(self) -> str:
        """Which kernel template the variant instantiates."""
        if self.strategy == "warp":
            return "warp_kernel"
        if self.strategy == "split":
            return "split_sums_kernel"     # then split_apply_kernel
        return "rows_kernel" if self.team_groups > 1 else "group_kernel"

    @property
    def elements_per_thread(self) -> int:
        """Elements one thread holds in registers (0 when looped)."""
        return self.items * self.vec


@dataclass(frozen=True)
class OffsetTerm:
    """One loop of the flat-index decomposition: ((i / div) % mod) * stride."""

    div: int
    mod: int | None    # None: the outermost loop needs no modulo
    stride: int
    per_batch: bool
    labels: str


@dataclass(frozen=True)
class CudaPlan(TargetRecord):
    """Everything the CUDA templates print for one layer: the CUDA target's record."""

    plan: Plan
    scalar: CudaScalar
    archs: tuple[int, ...]
    vec: int                          # widest legal vector (elements)
    offset_terms: tuple[OffsetTerm, ...]
    offset_type: str                  # int, or size_t when a stride depends on the batch
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
    summary: tuple[str, ...]

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

    def gives_way_to_split(self, v: Variant) -> bool:
        """True when variant v, launched with too few blocks to fill the SMs, is replaced by the
        split kernels: it sweeps its groups twice and this layer has them."""
        return self.split is not None and v.strategy == "looped"


@dataclass(frozen=True)
class Rescue:
    """Statistics summed again with d scaled by 2^-exponent when the sum of squares overflows."""

    exponent: int
    unit_literal: str      # 2^-exponent in the accumulation type
    epsilon_literal: str   # epsilon * 2^(-2*exponent) (0 below the normal range)
    largest_literal: str   # the largest finite accumulator: s2 above it (or NaN) is rescued

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
    return Rescue(e, c_literal(2.0 ** -e, kind), c_literal(scaled_eps, kind),
                  c_literal(a, kind))


@dataclass(frozen=True)
class Rows:
    """Channels-last teams of several groups: rows of `width` contiguous channels."""

    groups: int          # groups per team
    width: int           # channels per row (groups * channels per group)
    vec: int             # elements per load
    row_threads: int     # threads covering one row (a power of two up to 32)
    sums: int            # sum pairs per thread: groups one vector touches
    positions: int       # rows per team
    position_stride: int
    position_per_batch: bool

    @property
    def team_numel(self) -> int:
        """Elements one team owns."""
        return self.positions * self.width

    @property
    def pilot_rows(self) -> tuple[int, int, int]:
        """The rows whose first channel gives a group's pilot candidates: first, middle, last."""
        return (0, self.positions // 2, self.positions - 1)


ROW_BYTES = 64           # aim rows of at least two 32-byte sectors
SECTOR_BYTES = 32


def rows_geometry(plan: Plan, elem_bytes: int) -> Rows | None:
    """Return the rows layout when groups are narrower than a sector in channels-last memory."""
    lay = plan.layout
    cpg, groups = plan.channels_per_group, plan.num_groups
    if groups == 1 or not lay.channels_last or len(lay.stats_loops) != 2:
        return None
    pos, chan = lay.stats_loops
    if chan.stride != 1 or chan.extent != cpg or cpg * elem_bytes >= SECTOR_BYTES:
        return None
    for gpt in range(2, groups + 1):
        if groups % gpt:
            continue
        width = gpt * cpg
        if width * elem_bytes < ROW_BYTES and gpt != groups:
            continue
        vec = VECTOR_BYTES // elem_bytes
        while vec > 1 and (width % vec or pos.stride % vec or lay.batch_stride % vec
                           or (vec > cpg and vec % cpg) or (vec < cpg and cpg % vec)):
            vec //= 2
        rt = width // vec
        if rt <= WARP and rt & (rt - 1) == 0:
            sums = vec // cpg if vec >= cpg else 1
            return Rows(gpt, width, vec, rt, sums, pos.extent, pos.stride, pos.per_batch)
    return None


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def vector_width(plan: Plan, elem_bytes: int) -> int:
    """Return the widest load (elements, up to 16 bytes) every group's layout allows."""
    lay = plan.layout
    inner = lay.stats_loops[-1]
    if inner.stride != 1:
        return 1
    group_stride = plan.channels_per_group * lay.channel_stride
    w = VECTOR_BYTES // elem_bytes
    while w > 1:
        ok = (inner.extent % w == 0
              and all(lp.stride % w == 0 for lp in lay.stats_loops[:-1])
              and lay.batch_stride % w == 0 and group_stride % w == 0)
        if ok:
            return w
        w //= 2
    return 1


def offset_terms(plan: Plan) -> tuple[OffsetTerm, ...]:
    """Return the decomposition of a flat in-group index into an element offset."""
    loops = plan.layout.stats_loops
    terms = []
    inner = plan.group_numel
    for k, lp in enumerate(loops):
        inner //= lp.extent
        terms.append(OffsetTerm(div=inner, mod=None if k == 0 else lp.extent,
                                stride=lp.stride, per_batch=lp.per_batch, labels=lp.labels))
    assert inner == 1
    return tuple(terms)


def _channel_index(plan: Plan) -> tuple[int, int | None]:
    """Return (div, mod) so that the channel of flat index i is (i / div) % mod."""
    loops = plan.layout.group_loops
    k = next(i for i, lp in enumerate(loops) if lp.is_channel)
    div = math.prod(lp.extent for lp in loops[k + 1:])
    return div, (None if k == 0 else plan.channels_per_group)


def _warp_variant(numel: int, vec: int, opts: CudaOptions, e_max: int) -> Variant:
    vectors = _ceil(numel, vec)
    lanes = min(WARP, _next_pow2(vectors))
    items = _ceil(vectors, lanes)
    assert items * vec <= max(e_max, vec) and lanes * items * vec >= numel
    threads = opts.warp_team_block
    assert threads % WARP == 0 and threads % lanes == 0
    return Variant("warp", "warp", threads, lanes, 1, vec, items, threads // lanes, False,
                   f"a group of {numel} fits {lanes} lanes x {items * vec} elements")


def _block_variant(name: str, numel: int, vec: int, cluster: int, threads: int,
                   e_max: int, looped: bool, why: str, team_groups: int = 1) -> Variant:
    items = 0 if looped else _ceil(numel, cluster * threads * vec)
    if not looped:
        assert items * vec <= e_max, (items, vec, e_max)
        assert cluster * threads * vec * items >= numel
        # blocks take slabs of threads*vec elements in turn: none is left without one
        assert (cluster - 1) * threads * vec < numel
    strategy = "looped" if looped else ("cluster" if cluster > 1 else "block")
    return Variant(name, strategy, threads, threads * cluster, cluster, vec, items, 1,
                   cluster > 1, why, team_groups)


def _fit(numel: int, vec: int, e_max: int, max_cluster: int,
         block_threads: tuple[int, ...]) -> tuple[int, int] | None:
    """Return (threads, cluster) of the smallest team that holds a group on chip, or None.

    One block of any size comes first: a cluster's synchronisation costs more than a bigger block.
    """
    for threads in block_threads:
        if numel <= threads * e_max:
            return threads, 1
    for threads in block_threads:
        cluster = _ceil(numel, threads * e_max)
        if cluster <= max_cluster:
            # fewest blocks that still hold it, with no block left empty
            while cluster > 1 and _ceil(numel, cluster * threads * vec) * vec > e_max:
                cluster += 1
            return threads, cluster
    return None


def _wide(base: Variant, numel: int, vec: int, cluster_max: int, e_max: int,
          opts: CudaOptions, team_groups: int, onchip_threads: tuple[int, ...]) -> Variant | None:
    """Return the variant for few teams: each split over a full cluster, or None."""
    if numel < opts.wide_min_numel:
        return None
    t = base.threads if base.cluster > 1 or base.strategy == "looped" else opts.block_threads[0]
    k = min(cluster_max, _ceil(numel, t * vec))
    if k <= base.cluster:
        return None
    looped = _ceil(numel, k * t * vec) * vec > e_max
    if not looped and t not in onchip_threads:
        t = onchip_threads[-1]          # on chip, so a block size that does not spill
        looped = _ceil(numel, k * t * vec) * vec > e_max
    return _block_variant("wide", numel, vec, k, t, e_max, looped,
                          f"few teams: {k} blocks per team fill more SMs", team_groups)


def _split_variant(numel: int, vec: int, e_max: int, opts: CudaOptions) -> Variant | None:
    """Return the split variant: chunks of one smallest block's on-chip share of elements.

    None when a group is a single chunk (a rows team of such groups is looped only because it
    holds several of them).
    """
    threads = opts.block_threads[0]
    items = max(1, e_max // vec)
    chunk = threads * vec * items
    chunks = _ceil(numel, chunk)
    if chunks == 1:
        return None
    return Variant("split", "split", threads, threads, 1, vec, items, 1, False,
                   f"when a looped kernel's teams leave SMs idle: {chunks} chunks of {chunk} "
                   "elements per group in independent blocks, sums through a workspace",
                   chunks=chunks)


def lower_cuda(plan: Plan, options: CudaOptions | None = None) -> CudaPlan:
    """Return the CudaPlan for one layer."""
    opts = options or CudaOptions()
    layer = plan.layer
    sc = CUDA_SCALARS[layer.dtype]
    numel = plan.group_numel
    e_max = max(1, min(opts.onchip_bytes // sc.bytes, opts.onchip_elements))
    vec = vector_width(plan, sc.bytes)
    while vec > e_max:
        vec //= 2
    archs = tuple(sorted(layer.cuda_arch))
    has_sm90 = any(a >= 90 for a in archs)
    cluster_max = opts.max_cluster if has_sm90 else 1

    warp = narrow = wide = portable = split = None
    # block sizes for teams that keep their group in registers
    onchip_bt = tuple(t for t in opts.block_threads
                      if sc.acc != "double" or t <= DOUBLE_ONCHIP_THREADS) or opts.block_threads[:1]
    rows = rows_geometry(plan, sc.bytes)
    if rows is not None and rows.vec <= e_max:
        # One team owns rows.groups groups; block sizes keep whole rows per thread column.
        team_numel = rows.team_numel
        tg = rows.groups
        vec_r = rows.vec
        bt = opts.block_threads
        fit90 = _fit(team_numel, vec_r, e_max, cluster_max, onchip_bt) if has_sm90 else None
        if fit90 is not None and fit90[1] > 1:
            t, k = fit90
            narrow = _block_variant("narrow", team_numel, vec_r, k, t, e_max, False,
                                    f"{k} blocks of {t} threads hold {tg} groups on chip", tg)
        elif has_sm90 and fit90 is None:
            narrow = _block_variant("narrow", team_numel, vec_r, cluster_max, bt[-1], e_max,
                                    True, f"{tg} groups exceed {cluster_max} blocks: two sweeps",
                                    tg)
        fit1 = _fit(team_numel, vec_r, e_max, 1, onchip_bt)
        if fit1 is not None:
            portable = _block_variant("portable", team_numel, vec_r, 1, fit1[0], e_max, False,
                                      f"one block of {fit1[0]} threads holds {tg} groups", tg)
        else:
            portable = _block_variant("portable", team_numel, vec_r, 1, bt[-1], e_max, True,
                                      f"{tg} groups exceed one block's registers: two sweeps",
                                      tg)
        if has_sm90:
            wide = _wide(narrow or portable, team_numel, vec_r, cluster_max, e_max, opts, tg,
                         onchip_bt)
        # Looped rows teams: the split kernels take each group on its own, cut into chunks,
        # with the group's own (narrower) vectors.
        if any(v is not None and v.strategy == "looped" for v in (narrow, wide, portable)):
            split = _split_variant(numel, vec, e_max, opts)
        # Unaligned pointers: one group per block, scalar loads.
        fit_s = _fit(numel, 1, e_max, 1, onchip_bt)
        scalar = _block_variant("scalar", numel, 1, 1, fit_s[0] if fit_s else bt[-1], e_max,
                                fit_s is None, "x or y not aligned for vector loads")
    elif numel <= WARP * e_max:
        rows = None
        warp = _warp_variant(numel, vec, opts, e_max)
        scalar = _warp_variant(numel, 1, opts, e_max)
        scalar = Variant("scalar", **{k: getattr(scalar, k) for k in (
            "strategy", "threads", "lanes", "cluster", "vec", "items", "teams_per_block",
            "needs_sm90")}, why="x or y not aligned for vector loads")
    else:
        rows = None
        bt = opts.block_threads
        fit90 = _fit(numel, vec, e_max, cluster_max, onchip_bt) if has_sm90 else None
        if fit90 is not None and fit90[1] > 1:
            t, k = fit90
            narrow = _block_variant("narrow", numel, vec, k, t, e_max, False,
                                    f"{k} blocks of {t} threads hold a group on chip")
        elif has_sm90 and fit90 is None:
            t = bt[-1]
            narrow = _block_variant("narrow", numel, vec, cluster_max, t, e_max, True,
                                    f"a group of {numel} exceeds {cluster_max} blocks of "
                                    f"{t} threads x {e_max} elements: two sweeps")
        fit1 = _fit(numel, vec, e_max, 1, onchip_bt)
        if fit1 is not None:
            t, _ = fit1
            portable = _block_variant("portable", numel, vec, 1, t, e_max, False,
                                      f"one block of {t} threads holds a group on chip")
        else:
            t = bt[-1]
            portable = _block_variant("portable", numel, vec, 1, t, e_max, True,
                                      f"a group of {numel} exceeds one block's registers: "
                                      "two sweeps")
        # Few groups: split each over a full cluster so that more SMs stream it.
        if has_sm90:
            wide = _wide(narrow or portable, numel, vec, cluster_max, e_max, opts, 1, onchip_bt)
        # A looped team sweeps its group alone; with few teams the split kernels stand in.
        if any(v is not None and v.strategy == "looped" for v in (narrow, wide, portable)):
            split = _split_variant(numel, vec, e_max, opts)
        sv = 1
        pt = portable
        if pt.strategy == "looped":
            scalar = _block_variant("scalar", numel, sv, 1, pt.threads, e_max, True,
                                    "x or y not aligned for vector loads")
        else:
            fit_s = _fit(numel, sv, e_max, 1, onchip_bt)
            scalar = _block_variant("scalar", numel, sv, 1, fit_s[0], e_max, False,
                                    "x or y not aligned for vector loads")
    variants = tuple(v for v in (warp, narrow, wide, portable, split, scalar) if v is not None)
    for v in variants:
        assert v.threads % WARP == 0 and v.threads <= 1024, v
        assert v.cluster <= opts.max_cluster
        assert not v.needs_sm90 or has_sm90

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
    rescue = rescue_plan(numel, layer.dtype, sc.acc, layer.epsilon)
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
                     + (f", {v.elements_per_thread} elements per thread in registers"
                        if v.items else ", two sweeps over memory")
                     + f": {v.why}")
    return CudaPlan(
        plan=plan, scalar=sc, archs=archs, vec=vec, offset_terms=offset_terms(plan),
        offset_type="size_t" if per_batch else "int",
        channel_div=div, channel_mod=mod, group_stride=group_stride,
        group_stride_per_batch=lay.channel_per_batch, batch_stride=lay.batch_stride,
        max_batch=max_batch, variants=variants, warp=warp, narrow=narrow, wide=wide,
        portable=portable, split=split, scalar_variant=scalar, min_blocks_per_sm=MIN_WAVES,
        ab_in_smem=ab_in_smem, rows=rows, rescue=rescue,
        uses_cluster=any(v.cluster > 1 for v in variants),
        epsilon_literal=c_literal(layer.epsilon, acc),
        inv_numel_literal=c_literal(1.0 / numel, acc),
        scale_literals=tuple(c_literal(v, acc) for v in plan.scale_values),
        offset_literals=tuple(c_literal(v, acc) for v in plan.offset_values),
        summary=tuple(lines),
    )


def check_cuda_dtype(plan: Plan) -> None:
    """Raise TargetUnavailable for a dtype the CUDA target cannot produce."""
    if plan.layer.dtype not in CUDA_SCALARS:
        raise TargetUnavailable(f"CUDA target: dtype {plan.layer.dtype} is not supported")


def chosen_variant(cp: CudaPlan, batch: int, cc_major: int, sms: int,
                   aligned: bool = True, pool: bool = True) -> Variant:
    """Return the variant the generated host code launches (mirrors its run() function).

    pool: whether cudaMallocAsync gives the split kernels their workspace.
    """
    if not aligned:
        return cp.scalar_variant
    if cp.warp is not None:
        return cp.warp
    few = sms * cp.min_blocks_per_sm       # fewer blocks than this leave SMs idle
    v = cp.portable
    if cc_major >= 9:
        base = cp.narrow or cp.portable
        teams = batch * cp.plan.num_groups // base.team_groups
        if cp.wide is not None and teams * base.cluster < few:
            v = cp.wide
        elif cp.narrow is not None:
            v = cp.narrow
    teams = batch * cp.plan.num_groups // v.team_groups
    if pool and cp.gives_way_to_split(v) and teams * v.cluster < few:
        return cp.split
    return v
