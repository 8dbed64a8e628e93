"""CUDA target: plan decisions, rendered text, nvcc compile check, the generated .cu run under
the host emulation (and ThreadSanitizer), and on a GPU where one exists."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from gncodegen.targets.cuda.lower import chosen_variant, lower_cuda, rescue_plan
from gncodegen.targets.cmake import render_cmake
from gncodegen.targets.cuda.render import render_cuda
from gncodegen.targets.cuda.runner import (build_harness, compile_check, cuda_runner, gpu_name,
                                parse_ptxas, run_call)
from gncodegen.plan import lower, lower_spec
from gncodegen.dtypes import DTYPES, round_to_dtype
from gncodegen.reference import group_norm_reference
from gncodegen.pipeline import load_spec, parse_spec
from gncodegen.verify import Case, _per_group, compare, make_cases, verify_layer

from conftest import small_cuda_geometry

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
HAVE_NVCC = shutil.which("nvcc") is not None
GPU = gpu_name()

SMALL = small_cuda_geometry()

needs_nvcc = pytest.mark.skipif(not HAVE_NVCC, reason="nvcc not on PATH")
gpu = [pytest.mark.gpu, pytest.mark.skipif(GPU is None, reason="no NVIDIA GPU here")]


def layer_of(fmt: str, layout: str, size: list[int], groups, dtype: str = "single",
             name: str = "gn", extra: str = ""):
    """Return the one layer of a spec written inline."""
    text = (f"name: {name}\nnum_groups: {groups}\nformat: {fmt}\nlayout: {layout}\n"
            f"input_size: {size}\ndtype: {dtype}\nscale_initializer: narrow-normal\n"
            f"offset_initializer: narrow-normal\n{extra}")
    return parse_spec(text, base_dir=ROOT, stem=name).layers[0]


# (format, layout, input_size, groups, strategies SMALL gives it in single precision)
SHAPES = {
    "warp_sscb": ("SSCB", "column-major", [6, 5, 4], 2, {"warp"}),
    "cluster_sscb": ("SSCB", "column-major", [10, 10, 8], 2, {"cluster", "looped", "split"}),
    "nhwc": ("BSSC", "row-major", [8, 8, 16], 2, {"cluster", "looped", "split"}),
    "nhwc_warp": ("BSSC", "row-major", [5, 3, 16], 2, {"warp"}),
    "cbt": ("CBT", "column-major", [6, 70], 3, {"cluster", "block"}),
    "nchw_odd": ("BCSS", "row-major", [3, 7, 9], 1, {"cluster", "block"}),
    "looped": ("SSCB", "column-major", [40, 40, 4], 2, {"looped", "split"}),
    # more chunks per group (67) than threads per block (64): the records loop wraps
    "split_many": ("SSCB", "column-major", [92, 92, 4], 2, {"looped", "split"}),
    "channelwise": ("CB", "column-major", [16], 16, {"warp"}),
    "no_batch": ("SSC", "column-major", [9, 7, 24], 3, {"cluster", "looped", "split"}),
    "no_batch_warp": ("SSC", "column-major", [5, 3, 6], 3, {"warp"}),
    # channels-last groups narrower than a sector: teams of several groups (rows kernel)
    "rows_nhwc": ("BSSC", "row-major", [6, 6, 16], 8, {"cluster", "looped", "block"}),
    "rows_cbt": ("CBT", "column-major", [8, 30], 4, {"block"}),
    "rows_looped": ("BSSC", "row-major", [20, 20, 16], 8, {"looped", "split"}),
}
DTYPE_SHAPES = ("warp_sscb", "cluster_sscb", "nhwc", "cbt", "looped", "rows_nhwc")


def _sources(plan, options=None):
    cp = lower_cuda(plan, options)
    return cp, list(render_cuda(plan, "test.yaml", cuda_plan=cp))


# --------------------------------------------------------------------------- plan


def test_plan_fills_an_h100_on_reference_shapes():
    # Reference shape C (1, 320, 64x64, 32) has 32 groups; one block each would leave
    # most of 132 SMs idle, so the wide variant splits each group over an 8-block cluster.
    c = lower_cuda(lower(layer_of("BCSS", "row-major", [320, 64, 64], 32)))
    assert c.wide is not None and c.wide.cluster == 8 and c.wide.items > 0
    assert c.narrow is not None and c.narrow.strategy == "cluster"
    assert c.portable.strategy == "looped"        # sm_80 cannot hold 40960 floats in a block
    assert c.vec == 4
    # B (8, 64, 56x56, 32): enough groups; a group stays on chip in one 512-thread block (a
    # cluster's synchronisation costs more than a larger block).
    b = lower_cuda(lower(layer_of("BCSS", "row-major", [64, 56, 56], 32)))
    assert b.narrow is None and b.wide is None
    assert b.portable.strategy == "block" and b.portable.threads == 512
    assert b.portable.items * b.vec <= 16
    assert chosen_variant(b, 8, 9, 132) is b.portable
    assert chosen_variant(c, 1, 9, 132) is c.wide
    # Before sm_90 (no clusters) one looped block per group would use 32 of 108 SMs: the split
    # kernels give every 4096-element chunk its own block (320 blocks), unless no workspace.
    assert chosen_variant(c, 1, 8, 108) is c.split and c.split.chunks == 10
    assert c.split.chunk_numel == 4096 and c.split.threads == 256
    assert chosen_variant(c, 1, 8, 108, pool=False) is c.portable
    assert chosen_variant(c, 8, 8, 108) is c.portable       # 256 teams fill the GPU already
    # E (256, 1024) feature input: 32-element groups go to 8 lanes of a warp, float4 each.
    e = lower_cuda(lower(layer_of("CB", "column-major", [1024], 32)))
    assert e.warp is not None and e.warp.lanes == 8 and e.warp.items == 1 and e.vec == 4


def test_plan_channels_last_narrow_groups_share_a_team():
    # B in channels-last: 2 channels (8 bytes) per group would waste 3/4 of every 32-byte
    # sector, so a team owns 8 groups: rows of 16 contiguous floats, 4 threads per row.
    cp = lower_cuda(lower(layer_of("BSSC", "row-major", [56, 56, 64], 32)))
    assert cp.rows is not None
    assert (cp.rows.groups, cp.rows.width, cp.rows.vec, cp.rows.row_threads) == (8, 16, 4, 4)
    assert cp.narrow.team_groups == 8 and cp.narrow.kernel == "rows_kernel"
    assert cp.scalar_variant.team_groups == 1          # unaligned: one group per block
    # Wide enough groups keep one group per team.
    assert lower_cuda(lower(layer_of("BSSC", "row-major", [8, 8, 64], 4))).rows is None


def test_plan_vector_width_follows_layout_and_dtype():
    assert lower_cuda(lower(layer_of("BSSC", "row-major", [4, 4, 16], 4))).vec == 4
    assert lower_cuda(lower(layer_of("BSSC", "row-major", [4, 4, 6], 3))).vec == 2
    assert lower_cuda(lower(layer_of("BCSS", "row-major", [4, 3, 3], 2))).vec == 2
    assert lower_cuda(lower(layer_of("BCSS", "row-major", [3, 3, 3], 3))).vec == 1
    assert lower_cuda(lower(layer_of("BCSS", "row-major", [8, 8, 8], 2, "half"))).vec == 8
    assert lower_cuda(lower(layer_of("BCSS", "row-major", [8, 8, 8], 2, "double"))).vec == 2


def test_plan_without_sm90_has_no_clusters():
    layer = layer_of("BCSS", "row-major", [320, 64, 64], 32, extra="cuda_arch: [80]\n")
    cp = lower_cuda(lower(layer))
    assert not cp.uses_cluster and cp.narrow is None and cp.wide is None
    assert all(not v.needs_sm90 for v in cp.variants)


def test_plan_rescue_only_where_squares_can_overflow():
    # half: (2 * 65504)^2 times any group size fits a float; one element: d = x - x = 0.
    assert lower_cuda(lower(layer_of("SSCB", "column-major", [6, 5, 4], 2, "half"))).rescue is None
    assert lower_cuda(lower(layer_of("CB", "column-major", [16], 16))).rescue is None
    for dtype, acc in (("single", "float"), ("bfloat16", "float"), ("double", "double")):
        cp = lower_cuda(lower(layer_of("SSCB", "column-major", [6, 5, 4], 2, dtype)))
        assert cp.rescue is not None and cp.rescue == rescue_plan(60, dtype, acc, 1e-5)
        assert any("overflow rescue" in line for line in cp.summary)
    # The scaling keeps every sum of squares finite, up to the largest group size.
    for numel in (2, 60, 4096, 2**31 - 1):
        e = rescue_plan(numel, "single", "float", 1e-5).exponent
        assert (2 * 3.4028235e38 * 2.0**-e) ** 2 * numel <= 3.4028235e38 / 2
        e = rescue_plan(numel, "double", "double", 1e-5).exponent
        assert 4 * numel * 2.0 ** (2 * (1024 - e)) <= 2.0**1023


def test_plan_offsets_are_64_bit_past_int_max_elements():
    """An observation over INT_MAX elements (a video VAE's 1x512x16x180x320 and more) takes
    size_t offsets even in a layout whose strides do not depend on the batch; the kernel
    compiles with nvcc."""
    small = lower_cuda(lower(layer_of("SSCB", "column-major", [64, 64, 32], 8)))
    assert small.offset_type == "int"
    big = lower_cuda(lower(layer_of("SSCB", "column-major", [16384, 8192, 32], 32)))
    assert big.plan.observation_numel > 2**31 and big.offset_type == "size_t"
    header, source = render_cuda(big.plan, "big.yaml", cuda_plan=big)
    assert "size_t element_offset(int i, size_t batch)" in source.text
    compile_check(big.plan, big, [header, source])


def test_rendering_is_deterministic_and_prefixed():
    layer = layer_of("BSSC", "row-major", [8, 8, 16], 4, "half", name="enc")
    first = render_cuda(lower(layer), "x.yaml")
    second = render_cuda(lower(layer), "x.yaml")
    assert first == second
    header, source = first
    assert header.name == "enc_cuda.h" and source.name == "enc.cu"
    outside = source.text.split("} /* namespace */")[1]   # all else has internal linkage
    exported = re.findall(r"^cudaError_t (\w+)\(", outside, re.M)
    assert exported == ["enc_cuda_predict", "enc_cuda_predict_with_params"]
    assert "Do not edit" in header.text and "Plan" in header.text
    assert "__constant__ acc_t c_scale[16]" in source.text
    assert "atomic" not in source.text            # deterministic: no atomics at all


def test_cmake_lists_find_the_c_and_cuda_sources_there():
    plans = lower_spec(load_spec(ROOT / "examples" / "multi_layer.yaml"))
    text = render_cmake(plans, "multi_layer.yaml", "multi_layer").text
    assert "project(multi_layer VERSION" in text and "LANGUAGES C)" in text
    assert "80-real 90-real 90-virtual" in text and "check_language(CUDA)" in text
    layers = " ".join(p.prefix for p in plans)
    assert f"foreach(layer {layers})" in text
    assert "if(EXISTS ${CMAKE_CURRENT_SOURCE_DIR}/${layer}.cu)" in text


def test_parse_ptxas():
    text = """ptxas info    : Compiling entry function '_ZN45_GLOBAL__N__aaa_12_x_cu_6912group_kernelILi256ELi4ELi4ELi2ELb1EEEvPKfPfmS2_S2_' for 'sm_90'
ptxas info    : Function properties for _ZN45_GLOBAL__N__aaa_12_x_cu_6912group_kernelILi256ELi4ELi4ELi2ELb1EEEvPKfPfmS2_S2_
    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 136 bytes smem
"""
    (k,) = parse_ptxas(text)
    assert (k.arch, k.kernel, k.registers, k.shared_bytes) == (90, "group_kernel<256, 4, 4, 2, true>", 40, 136)
    assert (k.stack_bytes, k.spill_stores, k.spill_loads) == (8, 4, 4)


# --------------------------------------------------------------------------- nvcc


@needs_nvcc
@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_examples_compile_with_nvcc_without_spills(path):
    for plan in lower_spec(load_spec(path)):
        cp, sources = _sources(plan)
        kernels = compile_check(plan, cp, sources)
        assert {k.arch for k in kernels} == set(cp.archs)
        # baked + with params, of each variant (sizes at run time: the one runtime kernel)
        distinct = ({("runtime_group_kernel", "")} if plan.runtime_sizes else
                    {(v.kernel, v.template_args) for v in cp.variants})
        # a training layer adds forward_train's generic kernel (a fixed-size layer's own
        # instance of it; a runtime one shares the with-params instance), backward's two kernels
        # and one kernel a solver
        training = (6 if not plan.runtime_sizes else 5) if plan.layer.training else 0
        assert len(kernels) == (2 * len(distinct) + training) * len(cp.archs)
        for k in kernels:
            assert k.spill_stores == k.spill_loads == k.stack_bytes == 0, k


@needs_nvcc
@pytest.mark.parametrize("dtype", ["half", "bfloat16", "double"])
def test_every_dtype_compiles_with_nvcc_without_spills(dtype):
    for key in ("warp_sscb", "nhwc"):
        fmt, layout, size, groups, _ = SHAPES[key]
        plan = lower(layer_of(fmt, layout, size, groups, dtype))
        cp, sources = _sources(plan)
        for k in compile_check(plan, cp, sources):
            assert k.spill_stores == k.spill_loads == k.stack_bytes == 0, k


def _reference_layers():
    """(id, format, input_size, groups) of the reference shapes (benchmarks/shapes.py), NCHW and channels-last."""
    import sys
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from shapes import SHAPES as REFERENCE
    out = []
    for name, (_, c, spatial, g) in REFERENCE.items():
        reduced = "T" if name == "F" else "S" * len(spatial)
        out.append((f"{name}-NCHW", "BC" + reduced, [c, *spatial], g))
        if spatial:
            out.append((f"{name}-NHWC", "B" + reduced + "C", [*spatial, c], g))
    return out


@needs_nvcc
@pytest.mark.parametrize("ident, fmt, size, groups", _reference_layers(),
                         ids=[r[0] for r in _reference_layers()])
def test_reference_shapes_compile_with_nvcc_without_spills(ident, fmt, size, groups):
    # Every reference shape in every dtype with the real geometry. B's groups in
    # double once planned 1024-thread blocks that spilled; C's 40960-element groups do not fit
    # one block, so its plan has the split kernels.
    for dtype in ("single", "half", "bfloat16", "double"):
        plan = lower(layer_of(fmt, "row-major", size, groups, dtype))
        cp, sources = _sources(plan)
        kernels = compile_check(plan, cp, sources)
        names = {k.kernel.split("<")[0] for k in kernels}
        assert ({"split_sums_kernel", "split_apply_kernel"} <= names) == (cp.split is not None)
        assert cp.split is not None or not ident.startswith("C-")
        for k in kernels:
            assert k.spill_stores == k.spill_loads == k.stack_bytes == 0, (dtype, k)


# --------------------------------------------------------------------------- emulation


def _emulate(key: str, dtype: str):
    fmt, layout, size, groups, strategies = SHAPES[key]
    plan = lower(layer_of(fmt, layout, size, groups, dtype, name=f"{key}_{dtype}"))
    cp, sources = _sources(plan, SMALL)
    if dtype == "single":
        assert {v.strategy for v in cp.variants} == strategies
    return plan, cp, build_harness(plan, cp, sources, "emulation")


@pytest.mark.parametrize("key", list(SHAPES))
def test_emulation_single_every_layout_and_strategy(key):
    plan, cp, exe = _emulate(key, "single")
    report = verify_layer(plan.layer, "cuda", "host emulation", cuda_runner(plan, exe))
    assert report.passed, report
    # Before sm_90 the host code launches the cluster-free kernels: same answers.
    old = verify_layer(plan.layer, "cuda", "host emulation sm_80",
                       cuda_runner(plan, exe, {"GN_EMU_CC_MAJOR": "8"}), make_cases(plan.layer)[:2])
    assert old.passed, old
    if cp.split is not None:
        # No workspace (a device without memory pools): the looped kernels stand in.
        for cc in ("8", "9"):
            env = {"GN_EMU_CC_MAJOR": cc, "GN_EMU_NO_POOL": "1"}
            fallback = verify_layer(plan.layer, "cuda", f"host emulation sm_{cc}0, no pool",
                                    cuda_runner(plan, exe, env), make_cases(plan.layer)[:3])
            assert fallback.passed, fallback


@pytest.mark.parametrize("dtype", ["double", "half", "bfloat16"])
@pytest.mark.parametrize("key", DTYPE_SHAPES)
def test_emulation_every_dtype(key, dtype):
    plan, cp, exe = _emulate(key, dtype)
    report = verify_layer(plan.layer, "cuda", "host emulation", cuda_runner(plan, exe))
    assert report.passed, report


def _launches(stderr: str) -> list[tuple[int, int, int]]:
    return [tuple(map(int, m)) for m in re.findall(
        r"gn_emu: launch (\d+) blocks of (\d+) threads, cluster (\d+)", stderr)]


def _expected_launches(cp, v, batch: int) -> list[tuple[int, int, int]]:
    teams = batch * cp.plan.num_groups
    if v.strategy == "warp":
        return [(-(-teams // v.teams_per_block), v.threads, 1)]
    if v.strategy == "split":
        return [(teams * v.chunks, v.threads, 1)] * 2
    return [(teams // v.team_groups * v.cluster, v.threads, v.cluster)]


@pytest.mark.parametrize("key", ["warp_sscb", "cluster_sscb", "looped", "rows_nhwc", "rows_looped",
                                 "no_batch"])
def test_host_code_launches_what_chosen_variant_says(key):
    """The generated run() and cuda_plan.chosen_variant (the benchmark's and the plan's account
    of it) pick the same kernels for every device class, SM count and batch."""
    plan, cp, exe = _emulate(key, "single")
    rng = np.random.default_rng(4)
    seen = set()
    for batch in ((1, 3) if plan.has_batch else (1,)):
        x = round_to_dtype(rng.normal(size=plan.observation_numel * batch), "single")
        for cc in (8, 9):
            for sms in (1, 4, 64):
                for pool in (True, False):
                    v = chosen_variant(cp, batch, cc, sms, pool=pool)
                    env = {"GN_EMU_CC_MAJOR": str(cc), "GN_EMU_SMS": str(sms), "GN_EMU_TRACE": "1",
                           **({} if pool else {"GN_EMU_NO_POOL": "1"})}
                    res = run_call(exe, plan, "baked", batch, x, env=env)
                    assert res.returncode == 0, res.stderr
                    assert _launches(res.stderr) == _expected_launches(cp, v, batch), (batch, cc, sms)
                    seen.add(v.strategy)
    if cp.split is not None:
        assert "split" in seen and "looped" in seen, seen


def test_emulation_half_squares_do_not_overflow():
    # |x| up to 60000: (x - pilot)^2 reaches 1.4e10, far past half's 65504; the sums are float.
    plan, cp, exe = _emulate("cluster_sscb", "half")
    rng = np.random.default_rng(5)
    n = plan.observation_numel * 2
    x = round_to_dtype(np.clip(rng.normal(0, 30000, n), -60000, 60000), "half")
    x[::7] = 60000.0
    x[3::11] = -60000.0
    report = verify_layer(plan.layer, "cuda", "host emulation", cuda_runner(plan, exe),
                          [Case("|x| up to 60000", x, 2)])
    assert report.passed, report


@pytest.mark.parametrize("key", ["cluster_sscb", "warp_sscb", "rows_nhwc", "looped"])
def test_emulation_outlier_first_element_does_not_cancel(key):
    # A group whose first element sits 10*sqrt(n) standard deviations out: with that element as
    # the pilot, sum((x - pilot)^2) ~ n*var*100 cancels against (mean - pilot)^2 (5e-4 error
    # in single for 4096 elements); the median-of-three pilot avoids it.
    plan, cp, exe = _emulate(key, "single")
    rng = np.random.default_rng(6)

    def fill(r, k):
        x = r.normal(0.0, 1.0, k)
        x[0] = 10.0 * np.sqrt(k)
        return x

    batch = 2 if plan.has_batch else 1
    x = round_to_dtype(_per_group(plan.layer, batch, fill, rng), "single")
    report = verify_layer(plan.layer, "cuda", "host emulation", cuda_runner(plan, exe),
                          [Case("outlier first", x, batch)])
    assert report.passed and report.max_rel < 1e-6, report


# Amplitudes whose squares, summed over a group, overflow the accumulation type: the issue's
# 1e18 in single (4096-element groups overflow), and one whose every square overflows.
OVERFLOW_AMPLITUDES = {"single": (1e18, 1e37), "double": (1e153, 1e300),
                       "bfloat16": (1e18, 1e37)}


def _overflow_reference(plan, x, batch, ids):
    """Return the reference; float64's own squares of 1e153 overflow, so of those groups scaled
    by a power of two first, to |x| < 2^450 (exact: their output moves by epsilon's weight)."""
    x = x.copy()
    for g in np.unique(ids):
        at = ids == g
        finite = x[at][np.isfinite(x[at])]
        if finite.size and np.abs(finite).max() > 1e100:
            x[at] = np.ldexp(x[at], 450 - int(np.ceil(np.log2(np.abs(finite).max()))))
    return group_norm_reference(x, plan.layer, batch, plan.scale_values, plan.offset_values)


def _overflow_checks(plan, exe, env=None):
    """Run the overflow inputs; return the failures (empty when all is well)."""
    dtype = plan.layer.dtype
    batch = 2 if plan.has_batch else 1
    rng = np.random.default_rng(9)
    counter = iter(range(batch * plan.num_groups))
    ids = _per_group(plan.layer, batch, lambda r, k: np.full(k, float(next(counter))), rng)
    cases = {f"|x| up to {amp:g}": _per_group(plan.layer, batch,
                                              lambda r, k, a=amp: r.uniform(-1.0, 1.0, k) * a, rng)
             for amp in OVERFLOW_AMPLITUDES[dtype]}
    big = cases[f"|x| up to {OVERFLOW_AMPLITUDES[dtype][-1]:g}"]
    normal = _per_group(plan.layer, batch, lambda r, k: r.normal(0.0, 1.0, k), rng)
    # NaN in the first group and Inf (at its first element) in the last: they are NaN over
    # their group only, while their neighbours (same warp, same rows team) take the rescue.
    poisoned = big.copy()
    first, last = np.flatnonzero(ids == 0), np.flatnonzero(ids == ids.max())
    poisoned[first[len(first) // 2]] = np.nan
    poisoned[last[0]] = np.inf
    cases["NaN and Inf among overflowing groups"] = poisoned
    # One overflowing group among normal ones: only it takes the rescue.
    cases["one overflowing group"] = np.where(ids == 1, big, normal)
    failures = []
    outputs = {}
    for name, x in cases.items():
        x = round_to_dtype(x, dtype)
        for in_place in (False, True):
            y = cuda_runner(plan, exe, env)(Case(name, x, batch, in_place=in_place))
            res = compare(y, _overflow_reference(plan, x, batch, ids), DTYPES[dtype].tolerance, name)
            if not res.passed:
                failures.append(res)
            outputs[name] = y
    # The normal groups of the last case have the bits they have when no group overflows.
    y_normal = cuda_runner(plan, exe, env)(Case("normal", round_to_dtype(normal, dtype), batch))
    clean = ids != 1
    if not np.array_equal(outputs["one overflowing group"][clean], y_normal[clean]):
        failures.append("a rescue changed the bits of a group that did not overflow")
    return failures


@pytest.mark.parametrize("key", list(SHAPES))
def test_emulation_squares_overflow_every_strategy(key):
    # |x| up to 1e18 and 1e37: sum((x - pilot)^2) overflows float, and every kernel (warp,
    # block, cluster, looped, rows; sm_90 and the portable ones) sums the group again scaled.
    plan, cp, exe = _emulate(key, "single")
    assert not _overflow_checks(plan, exe)
    if key != "split_many":      # (slow, and sm_80 launches the same split kernels)
        assert not _overflow_checks(plan, exe, {"GN_EMU_CC_MAJOR": "8"})


@pytest.mark.parametrize("dtype", ["double", "bfloat16"])
@pytest.mark.parametrize("key", DTYPE_SHAPES)
def test_emulation_squares_overflow_every_dtype(key, dtype):
    plan, cp, exe = _emulate(key, dtype)
    assert not _overflow_checks(plan, exe)


def test_emulation_unaligned_pointers_take_the_scalar_kernel():
    plan, cp, exe = _emulate("nhwc", "single")
    assert cp.vec > 1
    x = round_to_dtype(np.random.default_rng(1).normal(0, 1, plan.observation_numel * 3), "single")
    res = run_call(exe, plan, "misaligned", 3, x)
    assert res.returncode == 0, res.stderr
    ref = group_norm_reference(x, plan.layer, 3, plan.scale_values, plan.offset_values)
    assert compare(res.y, ref, DTYPES["single"].tolerance, "misaligned").passed


@pytest.mark.parametrize("key", ["cluster_sscb", "no_batch"])
def test_refused_calls_return_invalid_value(key):
    plan, cp, exe = _emulate(key, "single")
    x = np.zeros(plan.observation_numel)
    res = run_call(exe, plan, "errors", 1, x)
    assert res.returncode == 0, res.stderr
    codes = dict(line.split() for line in res.stdout.splitlines())
    bad = codes["invalid_value"]
    assert codes["null_x"] == codes["null_y"] == codes["null_scale"] == bad
    assert codes["null_offset"] == codes["bad_batch"] == bad
    assert codes["zero_batch"] == ("0" if plan.has_batch else bad)


def test_split_workspace_comes_from_the_layers_pool_or_the_capture():
    """The records come from the layer's own pool (which keeps its memory), from the default
    pool inside a graph capture, and where pools are missing the looped kernel runs."""
    plan, cp, exe = _emulate("looped", "single")
    x = round_to_dtype(np.random.default_rng(8).normal(1, 2, plan.observation_numel * 2), "single")
    ref = group_norm_reference(x, plan.layer, 2, plan.scale_values, plan.offset_values)
    assert cp.split_bytes_per_group == cp.split.chunks * 4 * 4       # {s1, s2, scaled, pilot}
    nbytes = 2 * plan.num_groups * cp.split_bytes_per_group
    split = _expected_launches(cp, cp.split, 2)
    looped = _expected_launches(cp, chosen_variant(cp, 2, 8, 4, pool=False), 2)
    for extra, source, launches in (({}, "a created pool", split),
                                    ({"GN_EMU_CAPTURING": "1"}, "the default pool", split),
                                    ({"GN_EMU_NO_POOL": "1"}, None, looped)):
        env = {"GN_EMU_CC_MAJOR": "8", "GN_EMU_TRACE": "1", **extra}
        res = run_call(exe, plan, "baked", 2, x, env=env)
        assert res.returncode == 0, res.stderr
        allocations = re.findall(r"gn_emu: (\d+) bytes from (.+)", res.stderr)
        assert allocations == ([(str(nbytes), source)] if source else []), res.stderr
        assert _launches(res.stderr) == launches
        assert compare(res.y, ref, DTYPES["single"].tolerance, str(extra)).passed


@pytest.mark.slow
def test_split_kernels_with_the_real_geometry_on_shape_c():
    # The motivating case: C (1 x 320 x 64 x 64, 32 groups) on a 108-SM device without clusters
    # runs 320 blocks of 256 threads twice instead of 32 looped blocks; with clusters, 8-block
    # clusters hold each group on chip.
    plan = lower(layer_of("BCSS", "row-major", [320, 64, 64], 32))
    cp, sources = _sources(plan)
    exe = build_harness(plan, cp, sources, "emulation")
    x = round_to_dtype(np.random.default_rng(1).normal(2, 3, plan.observation_numel), "single")
    ref = group_norm_reference(x, plan.layer, 1, plan.scale_values, plan.offset_values)
    for cc, sms, launches in (("8", "108", [(320, 256, 1)] * 2), ("9", "132", [(256, 512, 8)])):
        env = {"GN_EMU_CC_MAJOR": cc, "GN_EMU_SMS": sms, "GN_EMU_TRACE": "1"}
        res = run_call(exe, plan, "baked", 1, x, env=env)
        assert res.returncode == 0, res.stderr
        assert _launches(res.stderr) == launches
        assert compare(res.y, ref, DTYPES["single"].tolerance, f"sm_{cc}0").passed


def test_emulation_is_deterministic():
    plan, cp, exe = _emulate("cluster_sscb", "single")
    x = round_to_dtype(np.random.default_rng(2).normal(3, 2, plan.observation_numel * 2), "single")
    a = run_call(exe, plan, "baked", 2, x).y
    b = run_call(exe, plan, "baked", 2, x).y
    assert a is not None and np.array_equal(a, b)


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_examples_under_emulation_with_the_real_geometry(path):
    # The exact sources `gncodegen build` writes (real block sizes and clusters), on the host.
    for plan in lower_spec(load_spec(path)):
        cp, sources = _sources(plan)
        exe = build_harness(plan, cp, sources, "emulation")
        report = verify_layer(plan.layer, "cuda", "host emulation", cuda_runner(plan, exe))
        assert report.passed, report
        old = verify_layer(plan.layer, "cuda", "host emulation sm_80",
                           cuda_runner(plan, exe, {"GN_EMU_CC_MAJOR": "8"}),
                           make_cases(plan.layer)[:1])
        assert old.passed, old


# --------------------------------------------------------------------------- ThreadSanitizer


def _tsan_input(plan, amplitude=1.0):
    return round_to_dtype(np.random.default_rng(3).normal(0, amplitude, plan.observation_numel),
                          "single")


def _tsan_run(plan, cp, sources, amplitude=1.0, env=None):
    exe = build_harness(plan, cp, sources, "tsan")
    x = _tsan_input(plan, amplitude)
    env = {"TSAN_OPTIONS": "halt_on_error=1 exitcode=66 report_signal_unsafe=0", **(env or {})}
    return run_call(exe, plan, "baked", 1, x, env=env)


def test_tsan_finds_no_race_in_generated_kernels():
    for key in ("cluster_sscb", "warp_sscb", "rows_nhwc"):
        fmt, layout, size, groups, _ = SHAPES[key]
        plan = lower(layer_of(fmt, layout, size, groups, name=f"tsan_{key}"))
        cp, sources = _sources(plan, SMALL)
        res = _tsan_run(plan, cp, sources)
        assert res.returncode == 0 and "ThreadSanitizer" not in res.stderr, res.stderr[-3000:]


@pytest.mark.parametrize("cc_major", ["9", "8"])
def test_tsan_finds_no_race_in_the_overflow_rescue(cc_major):
    # |x| ~ 1e30: every group sums twice, so the rescue's barriers (and, on sm_90, the second
    # round of cluster barriers) run under ThreadSanitizer.
    for key in ("cluster_sscb", "warp_sscb", "rows_nhwc", "looped"):
        fmt, layout, size, groups, _ = SHAPES[key]
        plan = lower(layer_of(fmt, layout, size, groups, name=f"tsan_rescue_{key}"))
        cp, sources = _sources(plan, SMALL)
        assert cp.rescue is not None
        # The looped shape runs the split kernels, and the looped one where there is no pool.
        for pool in ((True, False) if cp.split else (True,)):
            env = {"GN_EMU_CC_MAJOR": cc_major, **({} if pool else {"GN_EMU_NO_POOL": "1"})}
            res = _tsan_run(plan, cp, sources, 1e30, env)
            assert res.returncode == 0 and "ThreadSanitizer" not in res.stderr, res.stderr[-3000:]
            ref = group_norm_reference(_tsan_input(plan, 1e30), plan.layer, 1, plan.scale_values,
                                       plan.offset_values)
            assert compare(res.y, ref, DTYPES["single"].tolerance, key).passed


# (kernel whose rescue barrier is removed, environment that makes the host code launch it)
RESCUE_BARRIERS = {
    "group_kernel": {"GN_EMU_CC_MAJOR": "8", "GN_EMU_NO_POOL": "1"},   # looped, one block a group
    "split_sums_kernel": {"GN_EMU_CC_MAJOR": "8"},                     # a chunk's own rescue
    "split_apply_kernel": {"GN_EMU_CC_MAJOR": "8"},                    # the group's scaled sums
}


@pytest.mark.parametrize("kernel", list(RESCUE_BARRIERS))
def test_tsan_catches_a_planted_missing_barrier_in_the_rescue(kernel):
    # Without the barrier before the rescue's second block sums, a warp's second sums overwrite
    # shared memory another warp may still be reading.
    fmt, layout, size, groups, _ = SHAPES["looped"]
    plan = lower(layer_of(fmt, layout, size, groups, name="tsan_planted_rescue"))
    cp, sources = _sources(plan, SMALL)
    cu = next(s for s in sources if s.name.endswith(".cu"))
    barrier = "        __syncthreads(); /* every warp has read the first warp sums */\n"
    assert cu.text.count(barrier) == 3                 # group, split sums, split apply
    start = cu.text.index(f"\n{kernel}(const elem_t")
    at = cu.text.index(barrier, start)
    planted = type(cu)(cu.name, cu.text[:at] + cu.text[at + len(barrier):])
    sources = [planted if s is cu else s for s in sources]
    res = _tsan_run(plan, cp, sources, 1e30, RESCUE_BARRIERS[kernel])
    assert res.returncode == 66, res.stderr[-3000:]
    assert "WARNING: ThreadSanitizer: data race" in res.stderr


def test_tsan_catches_a_planted_missing_barrier():
    fmt, layout, size, groups, _ = SHAPES["cluster_sscb"]
    plan = lower(layer_of(fmt, layout, size, groups, name="tsan_planted"))
    cp, sources = _sources(plan, SMALL)
    cu = next(s for s in sources if s.name.endswith(".cu"))
    barrier = "    }\n    __syncthreads();\n    s1 = 0.0f;"
    assert cu.text.count(barrier) == 1
    planted = type(cu)(cu.name, cu.text.replace(barrier, "    }\n    s1 = 0.0f;"))
    sources = [planted if s is cu else s for s in sources]
    res = _tsan_run(plan, cp, sources)
    assert res.returncode == 66, res.stderr[-3000:]
    assert "WARNING: ThreadSanitizer: data race" in res.stderr


# --------------------------------------------------------------------------- CLI


def test_cli_verify_cuda_says_where_it_ran(tmp_path):
    proc = subprocess.run(["python3", "-m", "gncodegen.cli", "verify",
                           str(ROOT / "examples" / "features_channelwise.yaml"), "--target", "cuda"],
                          capture_output=True, text=True, cwd=tmp_path, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    where = "gpu (" if GPU else "host emulation"
    assert where in proc.stdout and "pass" in proc.stdout


def test_cli_cuda_runner_gpu_needs_a_gpu(tmp_path):
    """--cuda-runner gpu verifies on the GPU, or fails in one line and writes nothing."""
    out = tmp_path / "out"
    proc = subprocess.run(["python3", "-m", "gncodegen.cli", "build",
                           str(ROOT / "examples" / "features_channelwise.yaml"), "--target", "all",
                           "--cuda-runner", "gpu", "-o", str(out)],
                          capture_output=True, text=True, cwd=ROOT, check=False)
    if GPU:
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert f"gpu ({GPU})" in proc.stdout
        return
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: --cuda-runner: gpu needs ")
    assert not out.exists()


def test_cuda_runner_choice(monkeypatch):
    """auto follows the machine; emulation stays on the host where a GPU exists; gpu insists."""
    from gncodegen.targets import cuda as cuda_target
    from gncodegen.errors import TargetUnavailable

    monkeypatch.setattr(cuda_target, "gpu_name", lambda: "NVIDIA Test GPU")
    assert cuda_target.chosen_gpu("auto") == "NVIDIA Test GPU"
    assert cuda_target.chosen_gpu("gpu") == "NVIDIA Test GPU"
    assert cuda_target.chosen_gpu("emulation") is None
    monkeypatch.setattr(cuda_target, "gpu_name", lambda: None)
    assert cuda_target.chosen_gpu("auto") is None
    assert cuda_target.chosen_gpu("emulation") is None
    with pytest.raises(TargetUnavailable, match=r"^--cuda-runner: gpu needs "):
        cuda_target.chosen_gpu("gpu")


def test_cli_cuda_runner_emulation_on_a_gpu_machine(monkeypatch):
    """Asked for the emulation where a GPU exists, verification runs on the host and says so."""
    from click.testing import CliRunner

    from gncodegen.targets import cuda as cuda_target
    from gncodegen.cli import main

    monkeypatch.setattr(cuda_target, "gpu_name", lambda: "NVIDIA Test GPU")
    result = CliRunner().invoke(main, ["verify", str(ROOT / "examples" / "features_channelwise.yaml"),
                                       "--target", "cuda", "--cuda-runner", "emulation"])
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if " cuda " in line]
    assert rows and all("host emulation" in r and "pass" in r for r in rows)
    assert "as asked (--cuda-runner emulation), not on the GPU here (NVIDIA Test GPU)" in result.output


def test_cli_build_target_all_writes_c_cuda_cmake_and_the_ptxas_report(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(["python3", "-m", "gncodegen.cli", "build",
                           str(ROOT / "examples" / "sequence_cbt.yaml"), "--target", "all",
                           "-o", str(out)],
                          capture_output=True, text=True, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    names = {p.name for p in out.iterdir()}
    assert {"sequence_cbt.c", "sequence_cbt.h", "sequence_cbt.cu", "sequence_cbt_cuda.h",
            "CMakeLists.txt", "manifest.json"} <= names
    rows = [line for line in proc.stdout.splitlines() if line.startswith("sequence_cbt")]
    assert any(" c " in r and "pass" in r for r in rows)
    assert any(" cuda " in r and "pass" in r for r in rows)
    manifest = json.loads((out / "manifest.json").read_text())
    if HAVE_NVCC:
        kernels = manifest["cuda"]["kernels"]["sequence_cbt"]
        assert kernels and all(k["spill_stores"] == 0 and k["registers"] > 0 for k in kernels)
        assert {k["arch"] for k in kernels} == {"sm_80", "sm_90"}


@needs_nvcc
@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not on PATH")
def test_cmake_builds_the_c_and_the_cuda_library(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(["python3", "-m", "gncodegen.cli", "build",
                           str(ROOT / "examples" / "features_channelwise.yaml"), "--target", "all",
                           "-o", str(out)], capture_output=True, text=True, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    build = tmp_path / "build"
    for cmd in (["cmake", "-S", str(out), "-B", str(build), "-DCMAKE_CUDA_ARCHITECTURES=80"],
                ["cmake", "--build", str(build)]):
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        assert res.returncode == 0, res.stdout + res.stderr
    for lib, names in (("libfeatures_channelwise.so", ("features_channelwise_predict",)),
                       ("libfeatures_channelwise_cuda.so",
                        ("features_channelwise_cuda_predict",
                         "features_channelwise_cuda_predict_with_params"))):
        symbols = subprocess.run(["nm", "-D", "--defined-only", str(build / lib)],
                                 capture_output=True, text=True, check=True).stdout
        for name in names:
            assert re.search(rf" T {name}$", symbols, re.M), name


# --------------------------------------------------------------------------- GPU


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
@pytest.mark.gpu
@pytest.mark.skipif(GPU is None, reason="no NVIDIA GPU here")
def test_gpu_examples(path):
    for plan in lower_spec(load_spec(path)):
        cp, sources = _sources(plan)
        exe = build_harness(plan, cp, sources, "gpu")
        report = verify_layer(plan.layer, "cuda", "gpu", cuda_runner(plan, exe))
        assert report.passed, report


@pytest.mark.parametrize("dtype", ["single", "double", "half", "bfloat16"])
@pytest.mark.parametrize("key", list(SHAPES))
@pytest.mark.gpu
@pytest.mark.skipif(GPU is None, reason="no NVIDIA GPU here")
def test_gpu_every_layout_and_dtype(key, dtype):
    fmt, layout, size, groups, _ = SHAPES[key]
    for options in (None, SMALL):     # the real geometry, and the small one that splits more
        plan = lower(layer_of(fmt, layout, size, groups, dtype, name=f"g_{key}_{dtype}"))
        cp, sources = _sources(plan, options)
        exe = build_harness(plan, cp, sources, "gpu")
        report = verify_layer(plan.layer, "cuda", "gpu", cuda_runner(plan, exe))
        assert report.passed, report
        x = round_to_dtype(np.random.default_rng(4).normal(1, 2, plan.observation_numel * 3), dtype)
        batch = 3 if plan.has_batch else 1
        x = x[: plan.observation_numel * batch]
        a = run_call(exe, plan, "baked", batch, x).y
        b = run_call(exe, plan, "baked", batch, x).y
        assert a is not None and np.array_equal(a, b)          # same input, same bits
        m = run_call(exe, plan, "misaligned", batch, x).y
        ref = group_norm_reference(x, plan.layer, batch, plan.scale_values, plan.offset_values)
        assert compare(m, ref, DTYPES[dtype].tolerance, "misaligned").passed


@pytest.mark.gpu
@pytest.mark.skipif(GPU is None, reason="no NVIDIA GPU here")
def test_gpu_reference_shapes_large_groups():
    # Reference shape C in both layouts: the wide cluster path on a real device.
    for fmt, size in (("BCSS", [320, 64, 64]), ("BSSC", [64, 64, 320])):
        plan = lower(layer_of(fmt, "row-major", size, 32, name=f"big_{fmt.lower()}"))
        cp, sources = _sources(plan)
        exe = build_harness(plan, cp, sources, "gpu")
        cases = [c for c in make_cases(plan.layer) if c.batch == 1 or c.in_place]
        report = verify_layer(plan.layer, "cuda", "gpu", cuda_runner(plan, exe), cases)
        assert report.passed, report


@pytest.mark.gpu
@pytest.mark.skipif(GPU is None, reason="no NVIDIA GPU here")
def test_gpu_split_kernels_on_reference_shapes():
    # Planned for sm_80 only (no clusters): C in both layouts and B channels-last are looped
    # kernels with few teams, so the host code runs the split kernels (PTX for compute_80 runs
    # on any later device).
    for fmt, size in (("BCSS", [320, 64, 64]), ("BSSC", [64, 64, 320]), ("BSSC", [56, 56, 64])):
        plan = lower(layer_of(fmt, "row-major", size, 32, name=f"split_{fmt.lower()}_{size[0]}",
                              extra="cuda_arch: [80]\n"))
        cp, sources = _sources(plan)
        assert cp.split is not None and not cp.uses_cluster
        exe = build_harness(plan, cp, sources, "gpu")
        report = verify_layer(plan.layer, "cuda", "gpu", cuda_runner(plan, exe))
        assert report.passed, report


def test_ptxas_kernel_names_carry_no_per_compile_hash():
    """nvcc names its anonymous namespace with a hash that changes between compiles; the
    manifest must not record it, or generated/ would change on every build."""
    from gncodegen.targets.cuda.runner import _readable

    a = "_ZN49_GLOBAL__N__944585d8_16_nhwc_rowmajor_cu_9c73a93711rows_kernelILi256ELi1ELi4ELi4ELb0EEEvPKfPfmS2_S2_"
    b = a.replace("944585d8", "32129880")
    assert _readable(a) == _readable(b) == "rows_kernel<256, 1, 4, 4, false>"
    assert _readable("_ZN49_GLOBAL__N__57a0060f_1x_other") == "_ZN49_GLOBAL__N__1x_other"
