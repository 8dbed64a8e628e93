"""Numerics input classes: the generated code against the float64 reference
and against torch.nn.functional.group_norm on the same data, for every dtype of every target
this machine can run: C (single, double; the fast -O2 kernel and the compact -Os one) and the
generated CUDA under its host emulation (single, double, half, bfloat16).

What is fair. Both implementations get the same input, already rounded to the dtype, the same
scale, offset and epsilon, and work in that dtype (torch on the CPU; for half and bfloat16 its
output is stored in that dtype too, as ours is). Each error is
max |y - reference| over the finite reference values, divided by the output's scale
(max |reference|), exactly as verification measures it. Ours must be no worse than torch's,
except that any error within the dtype's tolerance counts as good:
below that floor neither result is wrong, and asking ours to beat torch's 3e-8 with 5e-8 would
test rounding luck, not the algorithm. NaN must appear exactly where the reference has it (a
NaN or Inf in a group spreads over that group only); torch's NaN pattern is not required.
Constant groups and one-element groups must give the offset bit for bit, and inputs whose
squares overflow the accumulation type (|x| up to 1e18 in single) must be within tolerance
whatever torch does: those must be right, not merely as good as torch.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest

from conftest import build_layers, cpu_has_avx512f, make_layer
from gncodegen.targets.c.runner import HOST_FLAGS
from gncodegen.plan import lower
from gncodegen.dtypes import DTYPES, round_to_dtype
from gncodegen.reference import from_canonical, group_norm_reference, to_flat
from gncodegen.targets.c import render_c
from gncodegen.targets.c.record import lower_c
from gncodegen.verify import Case
from gncodegen.targets.c.runner import c_runner

# name -> (format, layout, input_size, groups, epsilon); batch is BATCH for every layer.
LAYERS = {
    "sscb_g4_256": ("SSCB", "column-major", [8, 8, 16], 4, 1e-5),
    "sscb_g4_126": ("SSCB", "column-major", [9, 7, 8], 4, 1e-5),
    "nhwc_g2_4096": ("BSSC", "row-major", [32, 32, 8], 2, 1e-13),
    "cbt_g3_odd": ("CBT", "column-major", [9, 37], 3, 1e-13),
    "cb_channelwise": ("CB", "column-major", [16], "channel-wise", 1e-5),
    "sscb_g1_65536": ("SSCB", "column-major", [128, 128, 4], 1, 1e-5),
    # Tiny groups (shape E): the AVX-512 build reduces 16 groups together (80 groups: one call
    # of 64 per observation, 16 left to the portable job).
    "bc_g80_32": ("BC", "row-major", [2560], 80, 1e-5),
}
BATCH = 2
SIZE_FLAGS = tuple("-Os" if f == "-O2" else f for f in HOST_FLAGS)
# The verification build with AVX-512 (x86-64-v4): the ISA paths of the fast kernels.
AVX512_FLAGS = (*HOST_FLAGS, "-march=x86-64-v4")


AVX512_PARAM = pytest.param(AVX512_FLAGS, id="fast-avx512", marks=pytest.mark.skipif(
    not cpu_has_avx512f(), reason="this CPU has no AVX-512F (the CI machines have it)"))
BIG_MEAN = {"single": 1e4, "double": 1e4, "half": 1e3, "bfloat16": 1e2}
# Amplitude whose squares, summed over a group, overflow the accumulation type.
OVERFLOW_AMPLITUDE = {"single": 1e18, "double": 1e153, "half": 6e4, "bfloat16": 1e18}
DENORMAL = {"single": 1e-40, "double": 1e-310, "half": 1e-6, "bfloat16": 1e-40}

Fill = Callable[[np.random.Generator, int, str], np.ndarray]


@dataclass(frozen=True)
class InputClass:
    """A way to fill each (observation, group) of a layer's input."""

    name: str
    fill: Fill
    exact_offset: bool = False      # every output must equal the offset bit for bit
    must_be_right: bool = False     # within tolerance whatever torch does (numerics the layer promises)
    poison: str | None = None       # put this value into one group ('nan', 'inf', '-inf pilot')


def _normal(r, k, dt):
    return r.normal(0.0, 1.0, k)


def _big_mean(r, k, dt):
    return r.normal(BIG_MEAN[dt], 1.0, k)


def _tiny_std(r, k, dt):
    return 1.0 + 1e-6 * r.normal(0.0, 1.0, k)


def _overflow(r, k, dt):
    return r.uniform(-1.0, 1.0, k) * OVERFLOW_AMPLITUDE[dt]


def _constant(r, k, dt):
    return np.full(k, r.normal(0.0, 1.0) * 10.0 ** r.uniform(-3.0, 4.0))


def _denormal(r, k, dt):
    return r.normal(0.0, 1.0, k) * DENORMAL[dt]


def _outlier_first(r, k, dt):
    # The first element of the group (the kernel's pilot) sits ~sqrt(k) standard deviations
    # out, so sums of (x - pilot)^2 carry (mean - pilot)^2 ~ k * var and cancel against it.
    x = r.normal(0.0, 1.0, k)
    x[0] = 10.0 * math.sqrt(k)
    return x


CLASSES = [
    InputClass("normal", _normal),
    InputClass("mean 1e4, std 1", _big_mean),
    InputClass("std 1e-6 around 1", _tiny_std),
    InputClass("squares overflow (|x| up to 1e18 in single)", _overflow, must_be_right=True),
    InputClass("constant groups", _constant, exact_offset=True, must_be_right=True),
    InputClass("denormals", _denormal),
    InputClass("outlier as first element", _outlier_first),
    InputClass("NaN in one group", _normal, poison="nan"),
    InputClass("Inf in one group", _normal, poison="inf"),
    InputClass("-Inf as a group's first element", _normal, poison="-inf pilot"),
]
CLASS_IDS = ["normal", "mean1e4", "tinystd", "overflow", "constant", "denormal", "outlier",
             "nan", "inf", "neginf-pilot"]

# Every class runs on every target: none is kept out of the matrix.


def classes_for(target: str) -> list:
    """Return pytest params of the input classes run on a target: all of them."""
    del target
    return [pytest.param(c, id=i) for c, i in zip(CLASSES, CLASS_IDS)]


def make_input(layer, cls: InputClass, seed: int) -> np.ndarray:
    """Return a flat input in the layer's layout, rounded to its dtype, filled per group."""
    rng = np.random.default_rng(seed)
    c, g = layer.num_channels, layer.num_groups
    r = layer.observation_numel // c
    k = (c // g) * r
    grouped = np.stack([np.stack([cls.fill(rng, k, layer.dtype) for _ in range(g)])
                        for _ in range(BATCH)])
    if cls.poison:
        # Group 0 of the last observation is poisoned; every other group must stay clean.
        # A position away from the pilot unless the pilot is the target.
        pos = 0 if cls.poison == "-inf pilot" else min(k - 1, 1 + k // 3)
        grouped[-1, 0, pos] = {"nan": np.nan, "inf": np.inf, "-inf pilot": -np.inf}[cls.poison]
    canon = grouped.reshape(BATCH, c, r)
    with np.errstate(over="ignore"):
        return round_to_dtype(to_flat(from_canonical(canon, layer, BATCH), layer), layer.dtype)


def params(layer, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Return a caller's scale and offset, rounded to the dtype (no zero scale)."""
    rng = np.random.default_rng(seed)
    scale = rng.choice([-1.0, 1.0], layer.num_channels) * rng.uniform(0.5, 2.0, layer.num_channels)
    offset = rng.normal(0.0, 1.0, layer.num_channels)
    return round_to_dtype(scale, layer.dtype), round_to_dtype(offset, layer.dtype)


def rel_error(y: np.ndarray, ref: np.ndarray) -> float:
    """Return max |y - ref| over finite reference values, over max |ref| (verify's measure)."""
    fin = np.isfinite(ref)
    if not fin.any():
        return 0.0
    scale = float(np.abs(ref[fin]).max())
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.abs(np.asarray(y, dtype=np.float64)[fin] - ref[fin])
    diff = np.where(np.isnan(diff), np.inf, diff)
    worst = float(diff.max())
    return worst / scale if scale > 0 else (0.0 if worst == 0 else math.inf)


def layer_for(name: str, dtype: str):
    """Return the numerics layer called name in dtype."""
    fmt, layout, size, groups, eps = LAYERS[name]
    return make_layer(name=f"{name}_{dtype}", num_groups=groups, format=fmt, layout=layout,
                      input_size=size, dtype=dtype, epsilon=eps)


def reference(layer, x: np.ndarray, scale, offset) -> np.ndarray:
    """Return the float64 reference; for inputs whose float64 squares overflow, of x scaled by
    an exact power of two first (the output changes only by epsilon's weight, eps/var < 1e-100).
    """
    finite = np.abs(x[np.isfinite(x)])
    if finite.size and finite.max() > 1e100:
        x = np.ldexp(x, -300)
    return group_norm_reference(x, layer, BATCH, scale, offset)


def torch_group_norm(x: np.ndarray, layer, batch: int, scale, offset) -> np.ndarray:
    """Return torch.nn.functional.group_norm of a flat buffer, computed and stored in the
    layer's own dtype (half and bfloat16 too, so both sides round their output alike)."""
    import torch

    from gncodegen.reference import canonical, to_logical

    dtype = {"single": torch.float32, "double": torch.float64, "half": torch.float16,
             "bfloat16": torch.bfloat16}[layer.dtype]
    canon = canonical(to_logical(x, layer, batch), layer)
    t = torch.from_numpy(np.ascontiguousarray(canon)).to(dtype)
    y = torch.nn.functional.group_norm(t, layer.num_groups, torch.from_numpy(np.asarray(
        scale, dtype=np.float64)).to(dtype), torch.from_numpy(np.asarray(
            offset, dtype=np.float64)).to(dtype), layer.epsilon)
    return to_flat(from_canonical(y.to(torch.float64).numpy(), layer, batch), layer)


def judge(layer, cls: InputClass, y: np.ndarray, x: np.ndarray, scale, offset, what: str):
    """Assert the checks of the module docstring for one output; return (ours, torch) errors."""
    ref = reference(layer, x, scale, offset)
    assert np.array_equal(np.isnan(y), np.isnan(ref)), (
        f"{what}: NaN at {np.count_nonzero(np.isnan(y) != np.isnan(ref))} places where the "
        f"reference differs")
    inf = np.isinf(ref)
    assert np.array_equal(y[inf], ref[inf]), f"{what}: infinities differ from the reference"
    ours = rel_error(y, ref)
    with np.errstate(all="ignore"):
        theirs = rel_error(torch_group_norm(x, layer, BATCH, scale, offset), ref)
    floor = DTYPES[layer.dtype].tolerance
    print(f"\n{what}: ours {ours:.3g}, torch {theirs:.3g}, tolerance {floor:g}")
    one_element_groups = layer.observation_numel == layer.num_groups
    if cls.exact_offset or (one_element_groups and not cls.poison):
        expected = to_flat(from_canonical(np.broadcast_to(
            offset[None, :, None], (BATCH, layer.num_channels,
                                    layer.observation_numel // layer.num_channels)),
            layer, BATCH), layer)
        assert np.array_equal(y, expected), f"{what}: output is not exactly the offset"
    if cls.must_be_right:
        assert ours <= floor, f"{what}: error {ours:.3g} above the {layer.dtype} tolerance"
    assert ours <= max(theirs, floor), (
        f"{what}: error {ours:.3g} is worse than torch's {theirs:.3g} and above the "
        f"{layer.dtype} tolerance {floor:g}")
    return ours, theirs


# --------------------------------------------------------------------------- C target

_modules: dict = {}


def c_module(dtype: str, flags: tuple[str, ...]):
    """Return {layer name: (layer, runner)} for every numerics layer in dtype, built once."""
    key = (dtype, flags)
    if key not in _modules:
        layers = [layer_for(n, dtype) for n in LAYERS]
        plans, module = build_layers(*layers, flags=flags)
        _modules[key] = {n: (p.layer, c_runner(p, module)) for n, p in zip(LAYERS, plans)}
    return _modules[key]


@pytest.mark.parametrize("cls", classes_for("c"))
@pytest.mark.parametrize("layer_name", list(LAYERS))
@pytest.mark.parametrize("flags", [pytest.param(HOST_FLAGS, id="fast-O2"), AVX512_PARAM,
                                   pytest.param(SIZE_FLAGS, id="compact-Os")])
@pytest.mark.parametrize("dtype", ["single", "double"])
def test_c_input_class(dtype, flags, layer_name, cls):
    """The generated C on one input class: reference NaN pattern, no worse than torch."""
    layer, run = c_module(dtype, flags)[layer_name]
    x = make_input(layer, cls, seed=zlib.crc32(f"{layer_name}/{cls.name}".encode()))
    scale, offset = params(layer, seed=7)
    y = run(Case(cls.name, x, BATCH, scale=scale, offset=offset))
    judge(layer, cls, y, x, scale, offset, f"C {dtype} {flags[1]} {layer_name} / {cls.name}")


@pytest.mark.parametrize("dtype", ["single", "double"])
def test_c_in_place_matches_out_of_place(dtype):
    """In place gives the same bits as out of place on the hardest class (NaN included)."""
    layer, run = c_module(dtype, HOST_FLAGS)["nhwc_g2_4096"]
    cls = CLASSES[CLASS_IDS.index("nan")]
    x = make_input(layer, cls, seed=3)
    scale, offset = params(layer, seed=7)
    out = run(Case("out", x, BATCH, scale=scale, offset=offset))
    inp = run(Case("in", x.copy(), BATCH, in_place=True, scale=scale, offset=offset))
    assert np.array_equal(out, inp, equal_nan=True)


# --------------------------------------------------------------------------- runtime sizes

# The same classes through layers whose sizes but C are given at run time, called at the
# LAYERS sizes: the same memory, judged against the fixed layer's reference.
RUNTIME_LAYERS = ["sscb_g4_126", "nhwc_g2_4096", "cbt_g3_odd", "sscb_g1_65536"]


def runtime_layer_for(name: str, dtype: str):
    """Return (the layer with its non-C sizes at run time, those sizes) of a numerics layer."""
    fmt, layout, size, groups, eps = LAYERS[name]
    labels = [ch for ch in fmt if ch != "B"]
    layer = make_layer(name=f"{name}_{dtype}_rt", num_groups=groups, format=fmt, layout=layout,
                       input_size=[s if ch == "C" else None for ch, s in zip(labels, size)],
                       dtype=dtype, epsilon=eps)
    return layer, tuple(s for ch, s in zip(labels, size) if ch != "C")


_runtime_modules: dict = {}


def c_runtime_module(dtype: str, flags: tuple[str, ...]):
    """Return {layer name: (runtime layer, sizes, runner)}, built once per dtype and flags."""
    key = (dtype, flags)
    if key not in _runtime_modules:
        pairs = [runtime_layer_for(n, dtype) for n in RUNTIME_LAYERS]
        plans, module = build_layers(*(layer for layer, _ in pairs), flags=flags)
        _runtime_modules[key] = {n: (sizes, c_runner(p, module))
                                 for n, (_, sizes), p in zip(RUNTIME_LAYERS, pairs, plans)}
    return _runtime_modules[key]


@pytest.mark.parametrize("cls", classes_for("c"))
@pytest.mark.parametrize("layer_name", RUNTIME_LAYERS)
@pytest.mark.parametrize("flags", [pytest.param(HOST_FLAGS, id="fast-O2"),
                                   pytest.param(SIZE_FLAGS, id="compact-Os")])
@pytest.mark.parametrize("dtype", ["single", "double"])
def test_c_runtime_sizes_input_class(dtype, flags, layer_name, cls):
    """The runtime-size C kernels on one input class, as the fixed-size ones are judged."""
    sizes, run = c_runtime_module(dtype, flags)[layer_name]
    layer = layer_for(layer_name, dtype)
    x = make_input(layer, cls, seed=zlib.crc32(f"{layer_name}/{cls.name}".encode()))
    scale, offset = params(layer, seed=7)
    y = run(Case(cls.name, x, BATCH, scale=scale, offset=offset, sizes=sizes))
    judge(layer, cls, y, x, scale, offset,
          f"C runtime sizes {dtype} {flags[1]} {layer_name} / {cls.name}")


# --------------------------------------------------------------------------- CUDA target


_harnesses: dict = {}


def cuda_runner_for(layer_name: str, dtype: str):
    """Return (layer, runner) of the generated CUDA for one numerics layer (host emulation
    here; on a machine with a GPU the same driver runs the real kernel)."""
    from gncodegen.targets.cuda.lower import lower_cuda
    from gncodegen.targets.cuda.render import render_cuda
    from gncodegen.targets.cuda.runner import build_harness, cuda_runner, gpu_name

    key = (layer_name, dtype)
    if key not in _harnesses:
        layer = layer_for(layer_name, dtype)
        plan = lower(layer)
        cp = lower_cuda(plan)
        sources = list(render_cuda(plan, "numerics.yaml", cuda_plan=cp))
        mode = "gpu" if gpu_name() else "emulation"
        _harnesses[key] = (layer, cuda_runner(plan, build_harness(plan, cp, sources, mode)))
    return _harnesses[key]


CUDA_LAYERS = ["sscb_g4_256", "nhwc_g2_4096", "cb_channelwise"]
CUDA_RUNTIME_LAYERS = ["sscb_g4_126", "nhwc_g2_4096"]


def cuda_runtime_runner_for(layer_name: str, dtype: str):
    """Return (sizes, runner) of the generated CUDA of a numerics layer with runtime sizes."""
    from gncodegen.targets.cuda.lower import lower_cuda
    from gncodegen.targets.cuda.render import render_cuda
    from gncodegen.targets.cuda.runner import build_harness, cuda_runner, gpu_name

    key = (layer_name, dtype, "runtime")
    if key not in _harnesses:
        layer, sizes = runtime_layer_for(layer_name, dtype)
        plan = lower(layer)
        cp = lower_cuda(plan)
        sources = list(render_cuda(plan, "numerics.yaml", cuda_plan=cp))
        mode = "gpu" if gpu_name() else "emulation"
        _harnesses[key] = (sizes, cuda_runner(plan, build_harness(plan, cp, sources, mode)))
    return _harnesses[key]


@pytest.mark.parametrize("cls", classes_for("cuda"))
@pytest.mark.parametrize("layer_name", CUDA_RUNTIME_LAYERS)
@pytest.mark.parametrize("dtype", ["single", "double", "half", "bfloat16"])
def test_cuda_runtime_sizes_input_class(dtype, layer_name, cls):
    """The runtime-size CUDA kernel on one input class, as the fixed-size ones are judged."""
    sizes, run = cuda_runtime_runner_for(layer_name, dtype)
    layer = layer_for(layer_name, dtype)
    x = make_input(layer, cls, seed=zlib.crc32(f"{layer_name}/{cls.name}".encode()))
    scale, offset = params(layer, seed=7)
    y = run(Case(cls.name, x, BATCH, scale=scale, offset=offset, sizes=sizes))
    judge(layer, cls, y, x, scale, offset,
          f"CUDA runtime sizes {dtype} {layer_name} / {cls.name}")


@pytest.mark.parametrize("cls", classes_for("cuda"))
@pytest.mark.parametrize("layer_name", CUDA_LAYERS)
@pytest.mark.parametrize("dtype", ["single", "double", "half", "bfloat16"])
def test_cuda_input_class(dtype, layer_name, cls):
    """The generated CUDA on one input class: reference NaN pattern, no worse than torch."""
    layer, run = cuda_runner_for(layer_name, dtype)
    x = make_input(layer, cls, seed=zlib.crc32(f"{layer_name}/{cls.name}".encode()))
    scale, offset = params(layer, seed=7)
    y = run(Case(cls.name, x, BATCH, scale=scale, offset=offset))
    judge(layer, cls, y, x, scale, offset, f"CUDA {dtype} {layer_name} / {cls.name}")


@pytest.mark.parametrize("group_numel", [2, 3, 63, 126, 127, 256, 1000, 4097])
@pytest.mark.parametrize("flags", [HOST_FLAGS, SIZE_FLAGS], ids=["fast-O2", "compact-Os"])
@pytest.mark.parametrize("dtype", ["single", "double"])
def test_c_constant_groups_exactly_offset(dtype, flags, group_numel):
    """64 constant groups of many magnitudes: y is the offset bit for bit, with the baked
    parameters (scale 1, offset 0: y must be +-0) and with the caller's."""
    layer = make_layer(name=f"const_{group_numel}_{dtype}", num_groups=64, format="SCB",
                       input_size=[group_numel, 64], dtype=dtype)
    plans, module = build_layers(layer, flags=flags)
    run = c_runner(plans[0], module)
    rng = np.random.default_rng(group_numel)
    c = rng.normal(0.0, 1.0, (BATCH, 64)) * 10.0 ** rng.uniform(-3.0, 4.0, (BATCH, 64))
    x = round_to_dtype(to_flat(from_canonical(np.repeat(c[:, :, None], group_numel, axis=2),
                                              layer, BATCH), layer), dtype)
    y = run(Case("baked", x, BATCH))
    assert np.count_nonzero(y) == 0, f"{np.count_nonzero(y)} of {y.size} outputs are not 0"
    scale, offset = params(layer, seed=group_numel)
    y = run(Case("caller's", x, BATCH, scale=scale, offset=offset))
    expected = to_flat(from_canonical(np.broadcast_to(offset[None, :, None],
                                                      (BATCH, 64, group_numel)), layer, BATCH),
                       layer)
    wrong = np.count_nonzero(y != expected)
    assert wrong == 0, f"{wrong} of {y.size} outputs differ from the offset (max " \
                       f"{np.abs(y - expected).max():.3g})"


# --------------------------------------------------------------------------- firmware targets

# (target, dtype): every firmware target with the dtypes its FPU computes in hardware.
FIRMWARE = [("cortex-m0", "single"), ("cortex-m3", "single"), ("cortex-m4", "single"), ("cortex-m7", "single"),
            ("cortex-m7", "double"), ("cortex-m33", "single"), ("cortex-m55", "single"),
            ("riscv32", "single"), ("riscv32", "double"),
            ("aarch64-linux", "single"), ("aarch64-linux", "double")]


@pytest.mark.parametrize("opt_side", [0, 1], ids=["board-opt", "other-kernel"])
@pytest.mark.parametrize("target_name,dtype", FIRMWARE, ids=[f"{t}-{d}" for t, d in FIRMWARE])
def test_firmware_input_classes(target_name: str, dtype: str, opt_side: int):
    """Every input class in one image on a firmware target (QEMU): the same checks as above,
    at each optimization level the target verifies (its own, and the other side of
    __OPTIMIZE_SIZE__: the compact nest and the fast kernels both run on every core)."""
    from gncodegen.targets.firmware import BOARDS, verify_layer_on

    opt = BOARDS[target_name].verified_opts[opt_side]

    layer = layer_for("sscb_g4_126", dtype)
    plan = lower(layer)
    scale, offset = params(layer, seed=7)
    chosen = list(zip(CLASSES, CLASS_IDS))
    inputs = {c.name: make_input(layer, c, seed=zlib.crc32(f"firmware/{c.name}".encode()))
              for c, _ in chosen}
    cases = [Case(c.name, inputs[c.name], BATCH, scale=scale, offset=offset) for c, _ in chosen]
    outputs: dict = {}

    def capture(parsed):
        outputs.update(parsed)
        return parsed

    verify_layer_on(BOARDS[target_name], plan, list(render_c(plan, "numerics.yaml")),
                    cases=cases, corrupt=capture, opt=opt)
    failures = []
    for cls, _ in chosen:
        try:
            judge(layer, cls, np.asarray(outputs[cls.name], dtype=np.float64), inputs[cls.name],
                  scale, offset, f"{target_name} {opt} {dtype} / {cls.name}")
        except AssertionError as exc:
            failures.append(str(exc).splitlines()[0])
    assert not failures, "\n".join(failures)


# --------------------------------------------------------------------------- large groups

# (format, layout, input_size, groups): each kernel of the C target: runs (contiguous groups),
# rows (channels last, two groups), strided (a batch faster than the channels), and feature
# input (CB, one group over every channel, which the strided kernel takes at these sizes).
LARGE_LAYOUTS = {
    "runs": ("SSCB", "column-major", lambda n: [n // 4, 4, 1], 1),
    "rows": ("BSSC", "row-major", lambda n: [n // 4, 1, 8], 2),
    "strided": ("BSC", "column-major", lambda n: [n // 4, 4], 1),
    "feature": ("CB", "column-major", lambda n: [n], 1),
}
# Feature input holds at most 2^20 channels (the spec's limit), so one group of 2^24 is not one.
LARGE_CASES = [pytest.param(kind, numel, id=f"{kind}-2^{numel.bit_length() - 1}")
               for kind in LARGE_LAYOUTS for numel in (2 ** 18, 2 ** 20, 2 ** 24)
               if not (kind == "feature" and numel > 2 ** 20)]
LARGE_CLASSES = ["normal", "mean1e4", "outlier"]


@pytest.mark.slow
@pytest.mark.parametrize("kind,numel", LARGE_CASES)
@pytest.mark.parametrize("flags", [HOST_FLAGS, SIZE_FLAGS], ids=["fast-O2", "compact-Os"])
def test_c_large_groups_stay_accurate(flags, kind, numel):
    """Single precision stays within its tolerance at any group size: every partial sum takes
    a bounded number of terms and is folded into the group's totals with Kahan's compensation
    (plain float sums over 2^20 elements were 2e-4 off)."""
    fmt, layout, size, groups = LARGE_LAYOUTS[kind]
    layer = make_layer(name=f"large_{kind}_{numel}", num_groups=groups, format=fmt,
                       layout=layout, input_size=size(numel), dtype="single")
    plans, module = build_layers(layer, flags=flags)
    # One group of 2^18 channels is too wide for the runs kernel's per-channel arrays.
    assert lower_c(plans[0]).kernel.kind == ("strided" if kind == "feature" else kind)
    run = c_runner(plans[0], module)
    ones, zeros = np.ones(layer.num_channels), np.zeros(layer.num_channels)
    for cls_id in LARGE_CLASSES:
        cls = CLASSES[CLASS_IDS.index(cls_id)]
        total = layer.observation_numel   # groups of numel elements each
        x = round_to_dtype(cls.fill(np.random.default_rng(numel), total, "single"), "single")
        if fmt != "CB":
            x = to_flat(from_canonical(x.reshape(1, layer.num_channels, -1), layer, 1), layer)
        y = run(Case(cls.name, x, 1))
        ref = group_norm_reference(x, layer, 1, ones, zeros)
        err = rel_error(y, ref)
        assert err <= DTYPES["single"].tolerance / 10, (cls.name, err)


@pytest.mark.parametrize("numel", [64, 2880, 65536])
def test_c_compact_variance_needs_no_clamp(numel):
    """The compact nest does not clamp s2/N - shift^2 at zero (a clamp cost 16 bytes of the
    Cortex-M4 budget): after its first sweep the sums are around the mean, so the difference
    cannot go negative. Groups made to tempt it: two neighbouring floats in every proportion
    (the smallest spread a mean between grid points allows), a lone outlier as the pilot
    (sqrt(N) standard deviations out: the most an element can be), under an epsilon far below
    every variance, so a negative value would show as NaN or a wrong rstd."""
    layer = make_layer(name=f"lattice_{numel}", num_groups=4, format="SSCB",
                       input_size=[numel, 1, 4], dtype="single", epsilon=1e-30)
    plans, module = build_layers(layer, flags=SIZE_FLAGS)
    assert lower_c(plans[0]).kernel.compensated == (numel > 1024)
    run = c_runner(plans[0], module)
    rng = np.random.default_rng(numel)
    base = np.float32(8192.0)
    step = float(np.spacing(base))
    for trial in range(8):
        groups = []
        for g in range(4):
            if g < 3:    # two grid values, a proportion chosen at random (at least one of each)
                k = int(rng.integers(1, numel))
                vals = np.where(rng.permutation(numel) < k, float(base) + step, float(base))
            else:        # the pilot sqrt(N) standard deviations from the mean
                vals = rng.normal(0.0, 1.0, numel)
                vals[0] = math.sqrt(numel - 1) * float(np.std(vals[1:])) * (1 + trial)
            groups.append(vals)
        x = round_to_dtype(np.concatenate(groups), "single")
        x = to_flat(from_canonical(x.reshape(1, 4, numel), layer, 1), layer)
        y = run(Case("lattice", x, 1))
        ref = group_norm_reference(x, layer, 1, np.ones(4), np.zeros(4))
        assert not np.isnan(y).any()
        assert rel_error(y, ref) <= DTYPES["single"].tolerance, (trial, rel_error(y, ref))


@pytest.mark.parametrize("flags", [HOST_FLAGS, SIZE_FLAGS], ids=["fast-O2", "compact-Os"])
@pytest.mark.parametrize("layout", ["SSCB", "BSSC"])
def test_c_scale_too_large_to_fold(flags, layout):
    """A valid scale so large that scale * rstd overflows (1e37 with epsilon 1e-5): a constant
    group still gives exactly the offset, and other groups the reference (the fast kernels take
    the portable nest, which multiplies by the scale last)."""
    row = layout == "BSSC"
    layer = make_layer(name=f"huge_scale_{layout}", num_groups=2, format=layout,
                       layout="row-major" if row else "column-major", input_size=[8, 8, 4])
    plans, module = build_layers(layer, flags=flags)
    run = c_runner(plans[0], module)
    scale = round_to_dtype([1e37, 1.0, -1e37, 2.0], "single")
    offset = round_to_dtype([0.5, -1.0, 2.0, 0.0], "single")
    for cls_id in ("constant", "normal", "tinystd"):
        cls = CLASSES[CLASS_IDS.index(cls_id)]
        x = make_input(layer, cls, seed=11)
        y = run(Case(cls.name, x, BATCH, scale=scale, offset=offset))
        judge(layer, cls, y, x, scale, offset, f"C {flags[1]} {layout} scale 1e37 / {cls.name}")


@pytest.mark.parametrize("layer_name", ["sscb_g4_256", "nhwc_g2_4096"])
def test_cuda_scale_too_large_to_fold(layer_name):
    """The same on the generated CUDA: a channel whose a = scale * rstd overflowed is applied
    as scale * (rstd * d) + offset."""
    layer, run = cuda_runner_for(layer_name, "single")
    rng = np.random.default_rng(5)
    scale = round_to_dtype(rng.choice([1e37, -1e37, 1.0], layer.num_channels), "single")
    offset = round_to_dtype(rng.normal(0.0, 1.0, layer.num_channels), "single")
    for cls_id in ("constant", "normal"):
        cls = CLASSES[CLASS_IDS.index(cls_id)]
        x = make_input(layer, cls, seed=13)
        y = run(Case(cls.name, x, BATCH, scale=scale, offset=offset))
        judge(layer, cls, y, x, scale, offset, f"CUDA {layer_name} scale 1e37 / {cls.name}")


def largest_group_on(board, dtype: str) -> int:
    """Return the largest power-of-two group whose verification cases the board's image holds."""
    from gncodegen.targets import firmware as fw
    if not board.bare_metal:
        return 2 ** 18                  # a Linux program: as large as the test cares to go
    n = 64
    while True:
        layer = make_layer(name="probe", num_groups=1, format="SSC", input_size=[2 * n, 1, 4],
                           dtype=dtype)
        try:
            fw.firmware_cases(layer, board)
        except Exception:
            return n
        n *= 2


@pytest.mark.slow
@pytest.mark.parametrize("opt_side", [0, 1], ids=["board-opt", "other-kernel"])
@pytest.mark.parametrize("target_name,dtype", FIRMWARE, ids=[f"{t}-{d}" for t, d in FIRMWARE])
def test_firmware_largest_group_stays_accurate(target_name: str, dtype: str, opt_side: int):
    """The largest group each board's image holds (65536 elements and more on the Cortex-M
    boards), on the classes that long sums get wrong: mean 1e4 std 1 (a Cortex-M4 -Os build
    was 1.1e-5 off with plain sums), an outlier as pilot, normal data."""
    from gncodegen.targets.firmware import BOARDS, verify_layer_on

    board = BOARDS[target_name]
    n = min(largest_group_on(board, dtype), 2 ** 18)
    layer = make_layer(name=f"fw_large_{dtype}", num_groups=1, format="SSC",
                       input_size=[n // 4, 1, 4], dtype=dtype)
    plan = lower(layer)
    ones, zeros = np.ones(4), np.zeros(4)
    cases = []
    for cls_id in ("normal", "mean1e4", "outlier"):
        cls = CLASSES[CLASS_IDS.index(cls_id)]
        x = round_to_dtype(cls.fill(np.random.default_rng(n), n, dtype), dtype)
        x = to_flat(from_canonical(x.reshape(1, 4, -1), layer, 1), layer)
        cases.append(Case(cls.name, x, 1, scale=ones, offset=zeros))
    run = verify_layer_on(board, plan, list(render_c(plan, "numerics.yaml")), cases=cases,
                          opt=board.verified_opts[opt_side])
    assert run.report.passed, [(c.case, c.max_rel) for c in run.report.cases if not c.passed]
    assert run.report.max_rel <= DTYPES[dtype].tolerance / 10, run.report.max_rel


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["group", "rows"])
def test_cuda_large_groups_stay_accurate(kind):
    """The looped CUDA kernels, whose threads each add thousands of vectors, compensate their
    sums of squares: a group of 2^22 elements under the small emulation geometry (64-thread
    blocks, 4-block clusters, no split workspace) gives each thread 2^12 vectors to add."""
    from conftest import small_cuda_geometry
    from gncodegen.targets.cuda.lower import lower_cuda
    from gncodegen.targets.cuda.render import render_cuda
    from gncodegen.targets.cuda.runner import build_harness, cuda_runner

    n = 2 ** 22
    if kind == "group":
        layer = make_layer(name="cuda_large_group", num_groups=2, format="SCB",
                           input_size=[n // 2, 4])
    else:
        layer = make_layer(name="cuda_large_rows", num_groups=2, format="BSC",
                           layout="row-major", input_size=[n // 2, 4])
    plan = lower(layer)
    cp = lower_cuda(plan, small_cuda_geometry())
    assert {v.strategy for v in cp.variants} >= {"looped"}
    assert (cp.rows is not None) == (kind == "rows")
    exe = build_harness(plan, cp, list(render_cuda(plan, "numerics.yaml", cuda_plan=cp)),
                        "emulation")
    run = cuda_runner(plan, exe, {"GN_EMU_NO_POOL": "1"})   # the looped kernels, not split
    ones, zeros = np.ones(4), np.zeros(4)
    for cls_id in ("normal", "mean1e4", "outlier"):
        cls = CLASSES[CLASS_IDS.index(cls_id)]
        rng = np.random.default_rng(n)
        groups = np.stack([cls.fill(rng, n, "single") for _ in range(2)])   # (groups, n)
        x = round_to_dtype(to_flat(from_canonical(groups.reshape(1, 4, -1), layer, 1), layer),
                           "single")
        y = run(Case(cls.name, x, 1))
        err = rel_error(y, group_norm_reference(x, layer, 1, ones, zeros))
        assert err <= DTYPES["single"].tolerance / 10, (cls.name, err)
