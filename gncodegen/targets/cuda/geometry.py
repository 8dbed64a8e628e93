"""CUDA launch geometry: which teams own a group, how many elements each thread keeps, the
vector width of the loads, and the kernel variants a layer gets (module docstring of lower.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ...plan import Plan
from ...text import counted

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
# Baked parameters go to __constant__ memory up to this size: half the 64 KiB bank, the rest
# left to the application; larger ones to global memory.
CONSTANT_PARAM_BYTES = 32 * 1024
MIN_WAVES = 2              # the wide (or split) variant is used below this many blocks per SM
SPLIT_RECORD = 4           # accumulators per split chunk record: s1, s2, scaled, pilot
POOL_DEVICES = 64          # devices that can get the layer's split workspace pool
# Splitting a team over a cluster costs ~2-3 us of synchronisation on an H100 (measured with
# benchmarks/bench_cuda.py --cluster-sweep): worth it only for teams this large.
WIDE_MIN_NUMEL = 8192


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
                   f"a group of {numel} fits {counted(lanes, 'lane')} x "
                   f"{counted(items * vec, 'element')}")


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


@dataclass(frozen=True)
class Variants:
    """The kernel variants of one layer, by role (None where the layer has none)."""

    vec: int                          # widest legal vector (elements)
    archs: tuple[int, ...]
    warp: Variant | None
    narrow: Variant | None            # sm_90, enough blocks: smallest cluster that fits
    wide: Variant | None              # sm_90, few groups: split each group further
    portable: Variant | None          # any arch: one block per group
    split: Variant | None             # any arch: chunks of a group in independent blocks
    scalar: Variant                   # unaligned pointers
    rows: Rows | None                 # channels-last teams of several groups

    @property
    def all(self) -> tuple[Variant, ...]:
        """Every variant, in the order the plan comment lists them."""
        return tuple(v for v in (self.warp, self.narrow, self.wide, self.portable, self.split,
                                 self.scalar) if v is not None)


def choose_variants(plan: Plan, elem_bytes: int, acc_double: bool, archs: tuple[int, ...],
                    options: CudaOptions | None = None) -> Variants:
    """Return the kernel variants of a layer for its element size, accumulation and archs."""
    opts = options or CudaOptions()
    numel = plan.group_numel
    e_max = max(1, min(opts.onchip_bytes // elem_bytes, opts.onchip_elements))
    vec = vector_width(plan, elem_bytes)
    while vec > e_max:
        vec //= 2
    has_sm90 = any(a >= 90 for a in archs)
    cluster_max = opts.max_cluster if has_sm90 else 1

    warp = narrow = wide = portable = split = None
    # block sizes for teams that keep their group in registers
    onchip_bt = tuple(t for t in opts.block_threads
                      if not acc_double or t <= DOUBLE_ONCHIP_THREADS) or opts.block_threads[:1]
    rows = rows_geometry(plan, elem_bytes)
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

    return Variants(vec, archs, warp, narrow, wide, portable, split, scalar, rows)
