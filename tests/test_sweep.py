"""Every valid spec builds: a compile sweep over group sizes on both sides of every threshold at
which a target changes its kernel or its constants.

The thresholds come from the targets' own geometry (so a change there moves the sweep with it):
CUDA's warp, block, cluster, looped and split strategies, the wide variant, the rescue's scale
(its square underflows for large groups); the C kernels' short-group, lane, tiny-group (AVX-512),
row-block and per-channel-array limits. Each size is rendered in every dtype the target takes,
in both channel orders, and compiled: nvcc for every architecture with zero spills, the C with
the strict flags at -O0/-Os/-O3 and for AVX2 and AVX-512. Builds are cached by content, so a rerun
compiles only what changed.
"""

from __future__ import annotations

import shutil

import pytest

from conftest import make_layer
from gncodegen.dtypes import DTYPES
from gncodegen.plan import lower
from gncodegen.targets.c import render_c
from gncodegen.targets.c import kernel as ck
from gncodegen.targets.cuda import geometry as cg
from gncodegen.targets.cuda.lower import lower_cuda, rescue_plan
from gncodegen.targets.cuda.render import render_cuda
from gncodegen.targets.cuda.runner import compile_check
from gncodegen.targets.firmware.strict import STRICT_CONFIGS, StrictConfig, check_strict

# The largest group a spec allows with two groups per observation.
LARGEST = 2 ** 27


def _around(*points: int) -> list[int]:
    """Each threshold point (the last size on one side) and the next size (the first on the
    other), within 1..LARGEST."""
    return sorted({n for p in points for n in (p, p + 1) if 1 <= n <= LARGEST})


def cuda_sizes(dtype: str) -> list[int]:
    """Group sizes on both sides of every CUDA threshold for a dtype."""
    b = DTYPES[dtype].bytes
    e_max = max(1, min(cg.ONCHIP_BYTES // b, cg.ONCHIP_ELEMENTS))
    onchip = [t for t in cg.BLOCK_THREADS
              if DTYPES[dtype].acc != "double" or t <= cg.DOUBLE_ONCHIP_THREADS]
    points = [cg.WARP * e_max, *(t * e_max for t in onchip),
              cg.MAX_CLUSTER * onchip[-1] * e_max,       # the largest on-chip cluster team
              cg.BLOCK_THREADS[0] * e_max,               # one split chunk
              cg.WIDE_MIN_NUMEL]
    # Where the rescue's exponent steps past half the smallest exponent (its square underflows).
    for n in (2 ** k for k in range(1, 28)):
        r = rescue_plan(n, dtype, DTYPES[DTYPES[dtype].acc].spelling.ctype, 1e-5)
        if r is not None and 2 * r.exponent > 149:
            points.append(n)
            break
    return _around(*points) + [LARGEST]


def c_sizes(dtype: str) -> list[int]:
    """Group sizes on both sides of the C kernels' thresholds (contiguous groups)."""
    b = DTYPES[dtype].bytes
    max_lanes = max(ck.LANE_BYTES // b, ck.MIN_LANES)
    return _around(ck.PILOT_SAMPLES, ck.SHORT_GROUP, ck.MIN_LANES, max_lanes,
                   ck.SIMD_MAX_GROUP) + [ck.SIMD_LANES * 3, 2 ** 20 + 3]


def c_channel_counts(dtype: str) -> list[int]:
    """Channels per group on both sides of the rows kernel's and the channel arrays' limits."""
    b = DTYPES[dtype].bytes
    return _around(ck.ROW_BLOCK_BYTES // b, ck.ROW_BLOCK_MAX_BYTES // b,
                   ck.CHANNEL_ARRAY_BYTES // b) + [1, 3]


def layer_for(order: str, numel: int, dtype: str, cpg: int | None = None):
    """A two-group layer whose groups hold numel elements, channels first or last."""
    if cpg is None:
        cpg = 2 if numel % 2 == 0 and numel > 2 else 1
    spatial = numel // cpg
    fmt, size = {"nchw": ("BCS", [2 * cpg, spatial]), "nhwc": ("BSC", [spatial, 2 * cpg]),
                 "cb": ("BC", [2 * numel]), "cbt": ("BCT", [2 * cpg, spatial])}[order]
    name = f"sw_{order}_{dtype}_{cpg}x{spatial}"
    return make_layer(name=name, format=fmt, layout="row-major", input_size=size,
                      num_groups=2, dtype=dtype, epsilon=1e-5)


CUDA_CASES = [(dtype, order, n) for dtype in ("single", "double", "half", "bfloat16")
              for order in ("nchw", "nhwc") for n in cuda_sizes(dtype)]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (installed in CI)")
@pytest.mark.parametrize("dtype, order, numel", CUDA_CASES,
                         ids=[f"{d}-{o}-{n}" for d, o, n in CUDA_CASES])
def test_cuda_compiles_on_both_sides_of_every_threshold(dtype, order, numel):
    plan = lower(layer_for(order, numel, dtype))
    cp = lower_cuda(plan)
    sources = list(render_cuda(plan, "sweep.yaml", cuda_plan=cp))
    for k in compile_check(plan, cp, sources):
        assert k.spill_stores == k.spill_loads == k.stack_bytes == 0, (numel, k)


def _c_configs() -> list[StrictConfig]:
    keep = {"gcc", "gcc-avx512", "s390x"}
    return [c for c in STRICT_CONFIGS if c.label in keep] + [
        StrictConfig("gcc-avx2", "gcc", ("-march=x86-64-v3",))]


C_CASES = ([(dtype, "nchw", n, None) for dtype in ("single", "double") for n in c_sizes(dtype)]
           + [(dtype, "nhwc", 8 * cpg, cpg) for dtype in ("single", "double")
              for cpg in c_channel_counts(dtype)]
           + [(dtype, "cb", n, n) for dtype in ("single", "double")
              for n in _around(ck.SIMD_LANES, ck.SIMD_MAX_GROUP) + [ck.SIMD_LANES * 3]]
           + [("single", "cbt", 6 * 5, 6)])


@pytest.mark.parametrize("dtype, order, numel, cpg", C_CASES,
                         ids=[f"{d}-{o}-{n}-{c}" for d, o, n, c in C_CASES])
def test_c_compiles_on_both_sides_of_every_threshold(dtype, order, numel, cpg):
    sources = list(render_c(lower(layer_for(order, numel, dtype, cpg)), "sweep.yaml"))
    for config in _c_configs():
        for opt in ("-O0", "-Os", "-O3"):
            check_strict(sources, config, opt)


def test_the_sweep_reaches_every_strategy():
    """The sizes above do reach each CUDA strategy and each C kernel kind (else they test less
    than they claim)."""
    strategies = set()
    for dtype, order, n in CUDA_CASES:
        cp = lower_cuda(lower(layer_for(order, n, dtype)))
        strategies |= {v.strategy for v in cp.variants}
    assert strategies == {"warp", "block", "cluster", "looped", "split"}
    kinds, simd = set(), False
    for dtype, order, n, cpg in C_CASES:
        k = ck.plan_kernel(lower(layer_for(order, n, dtype, cpg)))
        kinds.add(k.kind)
        simd |= bool(k.simd_groups)
    assert kinds == {"runs", "rows", "strided"} and simd


def _param_channel_counts(dtype: str) -> list[int]:
    """Channel counts on both sides of where the baked parameters leave constant memory."""
    acc_bytes = DTYPES[DTYPES[dtype].acc].bytes
    return _around(cg.CONSTANT_PARAM_BYTES // (2 * acc_bytes))


PARAM_CASES = [(dtype, c) for dtype in ("single", "double", "half") for c in
               _param_channel_counts(dtype)]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (installed in CI)")
@pytest.mark.parametrize("dtype, channels", PARAM_CASES, ids=[f"{d}-{c}" for d, c in PARAM_CASES])
def test_cuda_compiles_on_both_sides_of_the_constant_bank(dtype, channels):
    layer = make_layer(name=f"sw_params_{dtype}_{channels}", format="CB", input_size=[channels],
                       num_groups=1, dtype=dtype)
    plan = lower(layer)
    cp = lower_cuda(plan)
    assert cp.params_in_constant == (2 * channels * DTYPES[DTYPES[dtype].acc].bytes
                                     <= cg.CONSTANT_PARAM_BYTES)
    for k in compile_check(plan, cp, list(render_cuda(plan, "sweep.yaml", cuda_plan=cp))):
        assert k.spill_stores == k.spill_loads == k.stack_bytes == 0, (channels, k)
