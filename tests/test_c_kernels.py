"""The C kernel's strategies (gncodegen/targets/c/kernel.py) against the float64 reference.

Every code path the fast kernel has is built and compared: each kernel kind (runs, rows,
strided) on layouts whose sizes leave vector remainders, in single and double, in place; each
compiler build that selects a different path or instruction set (-O2 verification build, -O3
-march=native, AVX2 without AVX-512, SSE only, clang, and -Os which compiles the compact nest);
OpenMP threads on and off; and the numerics the kernel owns: large means, tiny
variances, constant groups, single-element groups, NaN/Inf, denormals and |x| so large that the
squares overflow, each no worse than torch.nn.functional.group_norm.
"""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

from gncodegen.build import STRICT_WARNINGS
from gncodegen.targets.c.runner import HOST_FLAGS, build_c_module, with_openmp
from gncodegen.targets.c.kernel import plan_kernel
from gncodegen.plan import lower
from gncodegen.dtypes import DTYPES, round_to_dtype
from gncodegen.reference import group_norm_reference
from gncodegen.targets.c import render_c
from gncodegen.verify import Case, compare, make_cases, verify_layer
from gncodegen.targets.c.runner import c_runner

from conftest import cpu_has_avx512f, make_layer, torch_group_norm

FAST = ("-std=c99", "-O3", "-march=native", "-fPIC", *STRICT_WARNINGS)
AVX2 = ("-std=c99", "-O3", "-mavx2", "-mfma", "-mno-avx512f", "-fPIC", *STRICT_WARNINGS)
SSE = ("-std=c99", "-O3", "-mno-avx", "-fPIC", *STRICT_WARNINGS)
SIZE = ("-std=c99", "-Os", "-fPIC", *STRICT_WARNINGS)     # __OPTIMIZE_SIZE__: the compact nest
BUILDS = {"O2": HOST_FLAGS, "native": FAST, "avx2": AVX2, "sse": SSE, "Os": SIZE}

# name: (spec keys, expected kernel kind). Sizes are odd on purpose: runs of 70, 9, 5, 6 and
# channel blocks of 12 leave remainders for 4-, 8- and 16-wide vectors.
LAYOUTS = {
    "nchw": (dict(format="BCSS", layout="row-major", input_size=[6, 7, 5], num_groups=3),
             "runs"),
    "sscb_small": (dict(format="SSCB", input_size=[3, 1, 4], num_groups=2), "runs"),
    "nhwc": (dict(format="BSSC", layout="row-major", input_size=[5, 3, 12], num_groups=4),
             "rows"),
    "nhwc_one_group": (dict(format="BSSC", layout="row-major", input_size=[4, 3, 8],
                            num_groups=1), "runs"),
    "cbt": (dict(format="CBT", input_size=[12, 9], num_groups=3), "rows"),
    "btc_wide": (dict(format="BTC", layout="row-major", input_size=[7, 600], num_groups=3),
                 "rows"),
    "features": (dict(format="CB", input_size=[20], num_groups=4), "runs"),
    "channelwise": (dict(format="CB", input_size=[16], num_groups="channel-wise"), "runs"),
    "sbc": (dict(format="SBC", input_size=[9, 6], num_groups=2), "runs"),
    "batch_fastest": (dict(format="SSCB", layout="row-major", input_size=[4, 5, 6],
                           num_groups=3), "strided"),
    "no_batch": (dict(format="SSC", input_size=[5, 7, 6], num_groups=2), "runs"),
    # Tiny groups (shape E): 32 channels each, 80 per observation, so one observation is one
    # call of the AVX-512 kernel (64 groups) plus 16 groups left to the portable job.
    "tiny": (dict(format="BC", layout="row-major", input_size=[2560], num_groups=80), "runs"),
}


def _layer(name: str, dtype: str = "single", threads: int = 1, **extra):
    keys, _ = LAYOUTS[name]
    return make_layer(name=f"k_{name}_{dtype}_t{threads}", dtype=dtype, threads=threads,
                      **{**keys, **extra})


def _build(layer, flags, cc="cc"):
    plan = lower(layer)
    module = build_c_module((plan,), list(render_c(plan, "test.yaml")), flags=flags, cc=cc)
    return plan, module


# --------------------------------------------------------------------------- plan level


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_kernel_kind_per_layout(name):
    layer = _layer(name)
    assert plan_kernel(lower(layer)).kind == LAYOUTS[name][1]


def test_runs_kernel_widths_and_remainders():
    k = plan_kernel(lower(_layer("nchw")))               # groups of 2 channels x 35
    assert (k.lanes, k.stats_full, k.stats_remainder) == (32, 64, 6)
    assert k.halvings == (16, 8, 4, 2, 1)
    assert k.apply_run.extent == 35 and not k.channel_fastest
    kd = plan_kernel(lower(_layer("nchw", dtype="double")))
    assert kd.lanes == 32               # not 16: gcc would peel 16-iteration loops completely
    small = plan_kernel(lower(_layer("sscb_small")))     # 6 elements per group
    assert (small.lanes, small.stats_remainder) == (4, 2)
    feats = plan_kernel(lower(_layer("features")))
    assert feats.channel_fastest and feats.lanes == 4


def test_rows_kernel_blocks_whole_groups():
    k = plan_kernel(lower(_layer("nhwc")))
    assert (k.block_groups, k.block_channels, k.jobs_per_observation) == (4, 12, 1)
    wide = plan_kernel(lower(_layer("btc_wide")))        # 200 channels per group
    assert wide.block_channels == 200 and wide.jobs_per_observation == 3
    # With threads, one observation alone still gives every thread a block ...
    wide = dict(format="BSSC", layout="row-major", input_size=[5, 3, 64], num_groups=4)
    assert plan_kernel(lower(make_layer(**wide))).jobs_per_observation == 1
    assert plan_kernel(lower(make_layer(threads=2, **wide))).jobs_per_observation == 2
    # ... unless blocks would fall below 32 channels (gcc peels such loops and slows down).
    assert plan_kernel(lower(_layer("nhwc", threads=2))).jobs_per_observation == 1
    # A group too wide for the stack arrays falls back to the strided nest.
    huge = make_layer(format="BTC", layout="row-major", input_size=[3, 4096], num_groups=1)
    assert plan_kernel(lower(huge)).kind == "strided"


def test_rescue_constants_are_powers_of_two():
    for dtype, exp, kind in (("single", 80, np.float32), ("double", 560, np.float64)):
        k = plan_kernel(lower(_layer("nchw", dtype=dtype)))
        assert kind(float(k.rescue_unit_literal.rstrip("f"))) == 2.0 ** -exp
        assert k.rescue_unit_text == f"2^-{exp}"


def test_rendering_is_deterministic_and_prints_the_plan():
    plan = lower(_layer("nhwc"))
    a = render_c(plan, "t.yaml")
    b = render_c(lower(_layer("nhwc")), "t.yaml")
    assert [s.text for s in a] == [s.text for s in b]
    src = a[1].text
    assert "#if defined(__OPTIMIZE_SIZE__)" in src and "float s1[12];" in src
    assert "rows kernel: 4 groups (12 channels)" in a[0].text


# --------------------------------------------------------------------------- compiled


@pytest.mark.parametrize("dtype", ["single", "double"])
@pytest.mark.parametrize("name", sorted(LAYOUTS))
@pytest.mark.parametrize("build", ["native", "O2", "Os"])
def test_every_layout_matches_reference(name, dtype, build):
    layer = _layer(name, dtype)
    plan, module = _build(layer, BUILDS[build])
    report = verify_layer(layer, "c", build, c_runner(plan, module))
    assert report.passed, [(c.case, c.max_rel, c.nan_mismatch) for c in report.cases]


@pytest.mark.parametrize("build", ["avx2", "sse"])
@pytest.mark.parametrize("name", ["nchw", "nhwc", "features", "cbt", "sbc", "tiny"])
def test_instruction_sets(name, build):
    layer = _layer(name)
    plan, module = _build(layer, BUILDS[build])
    report = verify_layer(layer, "c", build, c_runner(plan, module))
    assert report.passed, [(c.case, c.max_rel) for c in report.cases]


@pytest.mark.skipif(shutil.which("clang") is None, reason="clang not installed")
@pytest.mark.parametrize("name", ["nchw", "nhwc", "features", "cbt"])
def test_clang_build(name):
    layer = _layer(name)
    plan, module = _build(layer, FAST, cc="clang")
    report = verify_layer(layer, "c", "clang", c_runner(plan, module))
    assert report.passed, [(c.case, c.max_rel) for c in report.cases]


def _run(plan, module, x, batch, in_place=False):
    return c_runner(plan, module)(Case("x", x, batch, in_place=in_place))


# Layouts big enough that a call crosses the kernel's threshold for a team of threads.
THREADED = {
    "nchw": dict(format="BCSS", layout="row-major", input_size=[8, 48, 41], num_groups=4),
    "nhwc": dict(format="BSSC", layout="row-major", input_size=[24, 41, 64], num_groups=4),
    "cbt": dict(format="CBT", input_size=[64, 300], num_groups=4),
    "features": dict(format="CB", input_size=[2000], num_groups=50),
    "tiny": dict(format="BC", layout="row-major", input_size=[2048], num_groups=64),
}


@pytest.mark.parametrize("name", sorted(THREADED))
def test_threads_match_one_thread_bit_for_bit(name, rng):
    one = make_layer(name=f"thr_{name}_1", **THREADED[name])
    two = make_layer(name=f"thr_{name}_2", threads=2, **THREADED[name])
    p1, m1 = _build(one, FAST)
    p2, m2 = _build(two, FAST)                          # build_c_module adds -fopenmp
    assert "-fopenmp" in with_openmp((p2,), FAST) and "-fopenmp" not in with_openmp((p1,), FAST)
    threshold = plan_kernel(p2).parallel_min_elements
    batch = max(7, -(-threshold // one.observation_numel))
    x = round_to_dtype(rng.normal(3.0, 2.0, batch * one.observation_numel), "single")
    y1 = _run(p1, m1, x, batch)
    y2 = _run(p2, m2, x, batch)
    y2_in_place = _run(p2, m2, x, batch, in_place=True)
    ref = group_norm_reference(x, one, batch)
    assert compare(y2, ref, DTYPES["single"].tolerance, "t2").passed
    # Each job is computed the same way whatever thread runs it.
    assert np.array_equal(y1, y2) and np.array_equal(y1, y2_in_place)
    # One observation alone still gives both threads work.
    assert plan_kernel(p2).jobs_per_observation >= 2


def test_threads_source_builds_without_openmp(tmp_path):
    """The OpenMP pragma is behind _OPENMP: a firmware build needs nothing and warns nothing."""
    plan = lower(_layer("nhwc", threads=2))
    header, source = render_c(plan, "t.yaml")
    assert "#pragma omp parallel for num_threads(2) schedule(static)\n" in source.text
    for s in (header, source):
        (tmp_path / s.name).write_text(s.text)
    for opts in (["-O3"], ["-O3", "-fopenmp"]):
        subprocess.run(["cc", "-std=c99", *opts, *STRICT_WARNINGS, "-c", source.name],
                       cwd=tmp_path, check=True, capture_output=True)


# --------------------------------------------------------------------------- numerics


def _groups_input(layer, batch, fill, rng):
    """Return a flat single/double buffer whose every group is fill(rng, count)."""
    from gncodegen.verify import _per_group
    return round_to_dtype(_per_group(layer, batch, fill, rng), layer.dtype)


NUMERIC_CLASSES = {
    "normal": lambda r, k: r.normal(0.0, 1.0, k),
    "mean 1e4 std 1": lambda r, k: r.normal(1e4, 1.0, k),
    "tiny variance": lambda r, k: r.normal(1.0, 1e-6, k),
    "mean -3e5 std 0.1": lambda r, k: r.normal(-3e5, 0.1, k),
    "mixed scales": lambda r, k: r.normal(0.0, 1.0, k) * 10.0 ** r.integers(-3, 4),
}


@pytest.mark.parametrize("build", ["native", "Os"])
@pytest.mark.parametrize("cls", sorted(NUMERIC_CLASSES))
@pytest.mark.parametrize("name", ["nchw", "nhwc", "features", "tiny"])
def test_accuracy_no_worse_than_torch(name, cls, build, rng):
    layer = _layer(name)
    plan, module = _build(layer, BUILDS[build])
    batch = 3
    x = _groups_input(layer, batch, NUMERIC_CLASSES[cls], rng)
    scale = round_to_dtype(layer.scale, "single")
    offset = round_to_dtype(layer.offset, "single")
    ref = group_norm_reference(x, layer, batch, scale, offset)
    ours = compare(_run(plan, module, x, batch), ref, 1.0, "c").max_rel
    theirs = compare(torch_group_norm(x, layer, batch, scale, offset), ref, 1.0, "torch").max_rel
    # No worse than PyTorch, or (where PyTorch is itself at rounding level: random normal
    # data, where its FMA saves one rounding) within two units in the last place of the
    # output's scale.
    assert ours <= max(theirs, 2.0 ** -22), (ours, theirs)


@pytest.mark.parametrize("build", ["native", "Os"])
@pytest.mark.parametrize("name", ["nchw", "nhwc", "features", "cbt", "batch_fastest", "tiny"])
def test_constant_groups_give_offset_exactly(name, build, rng):
    layer = _layer(name, offset_initializer="narrow-normal")
    plan, module = _build(layer, BUILDS[build])
    x = _groups_input(layer, 2, lambda r, k: np.full(k, r.normal(0, 1e3)), rng)
    y = _run(plan, module, x, 2)
    ref = group_norm_reference(x, layer, 2, round_to_dtype(layer.scale, "single"),
                               round_to_dtype(layer.offset, "single"))
    assert np.array_equal(y, ref)


@pytest.mark.parametrize("build", ["native", "Os"])
def test_single_element_groups_give_offset(build, rng):
    layer = _layer("channelwise", offset_initializer="narrow-normal")
    plan, module = _build(layer, BUILDS[build])
    x = round_to_dtype(rng.normal(0, 1e6, 16 * 4), "single")
    y = _run(plan, module, x, 4)
    assert np.array_equal(y, np.tile(round_to_dtype(layer.offset, "single"), 4))


@pytest.mark.parametrize("build", ["native", "Os"])
@pytest.mark.parametrize("name", ["nchw", "nhwc", "features", "tiny"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_poison_only_their_group(name, bad, build, rng):
    layer = _layer(name)
    plan, module = _build(layer, BUILDS[build])
    batch = 2
    x = round_to_dtype(rng.normal(0, 1, batch * layer.observation_numel), "single")
    x[len(x) // 3] = bad
    y = _run(plan, module, x, batch)
    ref = group_norm_reference(x, layer, batch)
    assert np.array_equal(np.isnan(y), np.isnan(ref)) and np.isnan(ref).any()
    assert compare(y, ref, DTYPES["single"].tolerance, "bad").passed


@pytest.mark.parametrize("build", ["native", "Os"])
@pytest.mark.parametrize("name", ["nchw", "nhwc"])
def test_denormal_inputs(name, build, rng):
    layer = _layer(name, epsilon=1e-30)
    plan, module = _build(layer, BUILDS[build])
    x = round_to_dtype(rng.normal(0, 1e-39, 2 * layer.observation_numel), "single")
    assert (np.abs(x[x != 0]) < np.finfo(np.float32).tiny).all()
    y = _run(plan, module, x, 2)
    ref = group_norm_reference(x, layer, 2)
    assert compare(y, ref, 1e-2, "denormal").passed      # epsilon dominates: y ~ x/sqrt(eps)
    assert np.isfinite(y).all()


@pytest.mark.parametrize("build", ["native", "O2", "Os"])
@pytest.mark.parametrize("name", ["nchw", "nhwc", "features", "cbt", "batch_fastest", "tiny"])
@pytest.mark.parametrize("magnitude", [1e18, 1e30, 1e37])
def test_squares_that_overflow_are_rescued(name, magnitude, build, rng):
    """Squares of (x - pilot) overflow float beyond ~1.8e19: the rescue sums scaled by 2^-80.

    The fast kernels handle |x| up to half the largest float; the compact nest (-Os, and the
    strided kernel) up to the largest float over the group's element count."""
    layer = _layer(name)
    plan, module = _build(layer, BUILDS[build])
    batch = 2
    x = round_to_dtype(rng.normal(0, magnitude, batch * layer.observation_numel), "single")
    x[1] = magnitude                                    # at least one big value per buffer
    y = _run(plan, module, x, batch)
    ref = group_norm_reference(x, layer, batch)
    compact = build == "Os" or plan_kernel(plan).kind == "strided"
    largest = float(np.finfo(np.float32).max)
    if compact and 2 * float(np.max(np.abs(x))) * plan.group_numel > largest:
        # The compact nest's documented limit: its first sweep sums x - x[0] unscaled, so
        # where |x - x[0]| * N may overflow the group comes out NaN -- never a wrong value.
        nan = np.isnan(y)
        assert nan.any()
        assert compare(np.where(nan, ref, y), ref, DTYPES["single"].tolerance, "big").passed
        return
    res = compare(y, ref, DTYPES["single"].tolerance, "big")
    assert res.passed, (res.max_rel, res.nan_mismatch)
    # The squares do overflow float: summed naively, the variance would be inf (y = 0 or NaN).
    g = plan.group_numel
    assert float(np.max(np.abs(x))) ** 2 * g > float(np.finfo(np.float32).max) or magnitude < 1e19


def test_double_squares_that_overflow_are_rescued(rng):
    layer = _layer("nchw", dtype="double", epsilon=1e-300)
    plan, module = _build(layer, FAST)
    x = rng.normal(0, 1e250, 2 * layer.observation_numel)
    y = _run(plan, module, x, 2)
    # The float64 reference squares x too, so it is given the data scaled by a power of two.
    ref = group_norm_reference(x * 2.0 ** -830, layer, 2)
    assert compare(y, ref, DTYPES["double"].tolerance, "big").passed


def test_blocked_sums_beat_the_single_accumulator_baseline(rng):
    """The MATLAB example: lane sums bring the error well below the old 6.6e-6."""
    layer = make_layer(name="matlab_gn", format="SSCB", input_size=[24, 24, 20], num_groups=4)
    plan, module = _build(layer, FAST)
    report = verify_layer(layer, "c", "native", c_runner(plan, module), make_cases(layer))
    assert report.passed and report.max_rel < 2e-6, report.max_rel


# --------------------------------------------------------------------------- strict builds


def _strict_sets():
    """One source per kernel kind and precision, plus threads (the OpenMP pragma)."""
    sets = []
    for name in ("nchw", "nhwc", "features", "cbt", "sbc", "batch_fastest", "btc_wide"):
        for dtype in ("single", "double"):
            sets.append((f"{name}_{dtype}", _layer(name, dtype)))
    sets.append(("nhwc_threads", make_layer(name="k_strict_t2", threads=2,
                                            **THREADED["nhwc"])))
    sets.append(("nchw_threads", make_layer(name="k_strict_t4", threads=4,
                                            **THREADED["nchw"])))
    return sets


@pytest.mark.parametrize("opt", ["-O0", "-Os", "-O3"])
@pytest.mark.parametrize("name, layer", _strict_sets(), ids=[s[0] for s in _strict_sets()])
def test_every_kind_compiles_strict_everywhere(name, layer, opt):
    """Issue 5's flags on gcc, clang, g++ and the Arm cross compilers, fast and compact shapes
    alike (-O0 and -O3 compile the fast shape, -Os the compact one)."""
    from gncodegen.targets import firmware as fw
    sources = list(render_c(lower(layer), "test.yaml"))
    for config in fw.STRICT_CONFIGS:
        fw.check_strict(sources, config, opt)


# --------------------------------------------------------------------------- AVX-512 tiny groups


# The build that compiles the AVX-512 kernel whatever -march=native says. The CI machines have
# AVX-512; elsewhere running it would die of an illegal instruction, so it is skipped there.
AVX512 = ("-std=c99", "-O3", "-march=x86-64-v4", "-fPIC", *STRICT_WARNINGS)
needs_avx512 = pytest.mark.skipif(not cpu_has_avx512f(),
                                  reason="this CPU has no AVX-512F (the CI machines have it)")


def _tiny(n: int, groups: int, dtype: str = "single", **extra):
    return make_layer(name=f"tiny_{n}_{groups}_{dtype}", format="BC", layout="row-major",
                      input_size=[n * groups], num_groups=groups, dtype=dtype, **extra)


def test_tiny_groups_take_the_simd_kernel_only_where_it_fits():
    k = plan_kernel(lower(_tiny(32, 32)))                 # shape E
    assert (k.simd_groups, k.simd_vectors) == (64, 2)
    assert plan_kernel(lower(_tiny(128, 8))).simd_vectors == 8
    # MATLAB's own feature format: channels fastest, then the batch, so groups tile too.
    cb = make_layer(name="tiny_cb", format="CB", input_size=[256], num_groups=8)
    assert plan_kernel(lower(cb)).simd_groups == 64
    not_taken = [
        _tiny(32, 32, dtype="double"),                    # single precision only
        _tiny(40, 8),                                     # not a whole number of registers
        _tiny(144, 8),                                    # large enough for the lane sums
        make_layer(name="tiny_nchw", format="BCS", layout="row-major", input_size=[64, 2],
                   num_groups=4),                         # a group is two runs
        make_layer(name="tiny_sbc", format="SBC", input_size=[2, 512], num_groups=16),
    ]
    for layer in not_taken:
        assert plan_kernel(lower(layer)).simd_groups == 0, layer.name


def test_simd_tree_puts_each_groups_sum_in_its_lane(rng):
    """Emulate the tree's blends and two-source permutes with NumPy: lane k = sum of group k."""
    from gncodegen.targets.c.kernel import simd_tree
    tree, order = simd_tree(16)
    groups = rng.integers(-1000, 1000, (16, 16)).astype(np.int64)   # exact sums
    v = [None] * 16
    for k in range(16):
        v[order[k]] = groups[k]
    for pairs, mask, index in tree:
        m = int(mask, 16)
        for i in range(pairs):
            a, b = v[2 * i], v[2 * i + 1]
            both = np.concatenate([a, b])
            blend = np.where([(m >> j) & 1 for j in range(16)], b, a)
            v[i] = blend + both[list(index)]
    assert np.array_equal(v[0], groups.sum(axis=1))
    assert len(tree) == 4 and [p for p, _, _ in tree] == [8, 4, 2, 1]


def test_tiny_group_source_compiles_the_avx512_kernel_only_where_asked(tmp_path):
    plan = lower(_tiny(32, 80))
    header, source = render_c(plan, "t.yaml")
    for s in (header, source):
        (tmp_path / s.name).write_text(s.text)
    asm = {}
    for label, flags in (("avx512", ["-march=x86-64-v4", "-O3"]), ("avx2", ["-mavx2", "-O3"]),
                         ("size", ["-march=x86-64-v4", "-Os"])):
        proc = subprocess.run(["cc", "-std=c99", *flags, *STRICT_WARNINGS, "-S", "-o", "-",
                               source.name], cwd=tmp_path, check=True, capture_output=True,
                              text=True)
        asm[label] = proc.stdout
    assert "vpermt2ps" in asm["avx512"] or "vpermi2ps" in asm["avx512"]
    assert "tiny_32_80_single_groups" in asm["avx512"]
    assert "tiny_32_80_single_groups" not in asm["avx2"]
    assert "tiny_32_80_single_groups" not in asm["size"]   # -Os: the compact nest only


@needs_avx512
@pytest.mark.parametrize("n, groups", [(16, 64), (32, 80), (48, 70), (128, 17)])
def test_tiny_groups_avx512_match_reference(n, groups, rng):
    """Whole calls of 64 groups and the groups left over, out of place and in place."""
    layer = _tiny(n, groups)
    plan, module = _build(layer, AVX512)
    assert plan_kernel(plan).simd_groups == 64
    for batch in (1, 3, 7):
        x = round_to_dtype(rng.normal(rng.normal(0, 5, 1), 2.0, batch * layer.observation_numel),
                           "single")
        scale = round_to_dtype(rng.normal(1, 0.5, layer.num_channels), "single")
        offset = round_to_dtype(rng.normal(0, 0.5, layer.num_channels), "single")
        ref = group_norm_reference(x, layer, batch, scale, offset)
        run = c_runner(plan, module)
        y = run(Case("x", x, batch, scale=scale, offset=offset))
        res = compare(y, ref, DTYPES["single"].tolerance, "avx512")
        assert res.passed, (batch, res.max_rel)
        y_in = run(Case("x", x, batch, scale=scale, offset=offset, in_place=True))
        assert np.array_equal(y, y_in)


@needs_avx512
def test_tiny_groups_avx512_redo_only_the_groups_that_need_it(rng):
    """A group with NaN, Inf or squares that overflow goes to the portable job; its neighbours
    in the same block of 16 keep the AVX-512 result."""
    layer = _tiny(32, 64)
    plan, module = _build(layer, AVX512)
    x = round_to_dtype(rng.normal(0, 1, 2 * layer.observation_numel), "single")
    x[3 * 32 + 5] = np.nan
    x[17 * 32 + 1] = np.inf
    x[40 * 32: 41 * 32] = round_to_dtype(rng.normal(0, 1e30, 32), "single")
    x[70 * 32: 71 * 32] = 7.25                             # a constant group: offset exactly
    y = _run(plan, module, x, 2)
    ref = group_norm_reference(x, layer, 2)
    assert np.array_equal(np.isnan(y), np.isnan(ref))
    assert np.isnan(y[3 * 32: 4 * 32]).all() and np.isnan(y[17 * 32: 18 * 32]).all()
    res = compare(y, ref, DTYPES["single"].tolerance, "redo")
    assert res.passed, res.max_rel
    assert np.array_equal(y[70 * 32: 71 * 32], round_to_dtype(layer.offset[6 * 32: 7 * 32],
                                                              "single"))


@pytest.mark.parametrize("dtype, fn", [("single", "fmaf"), ("double", "fma")])
def test_fused_multiply_add_only_where_the_target_has_it(dtype, fn, tmp_path):
    """The sweeps fuse a*b + c into one instruction where the target has FMA; elsewhere they
    multiply and add rather than call libm's software fma."""
    plan = lower(_layer("nchw", dtype))
    header, source = render_c(plan, "t.yaml")
    assert f"_MAC(a, b, c) {fn}(a, b, c)" in source.text
    for s in (header, source):
        (tmp_path / s.name).write_text(s.text)
    asm = {}
    # (clang defines __FMA__ but leaves glibc's FP_FAST_FMAF unset.)
    for label, cc, flags in (("fma", "cc", ["-mavx2", "-mfma"]), ("baseline", "cc", []),
                             ("clang-fma", "clang", ["-mavx2", "-mfma"])):
        proc = subprocess.run([cc, "-std=c99", "-O3", *flags, *STRICT_WARNINGS, "-S", "-o", "-",
                               source.name], cwd=tmp_path, check=True, capture_output=True,
                              text=True)
        asm[label] = proc.stdout
    for label in ("fma", "clang-fma"):
        assert "vfmadd" in asm[label] and f"call\t{fn}" not in asm[label], label
    assert "vfmadd" not in asm["baseline"] and f"call\t{fn}" not in asm["baseline"]
