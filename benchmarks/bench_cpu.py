#!/usr/bin/env python3
"""CPU benchmark of the generated C against PyTorch, ONNX Runtime and NumPy.

    python3 benchmarks/bench_cpu.py                  # every shape, NCHW and NHWC
    python3 benchmarks/bench_cpu.py --shapes A,E --quick

For each reference shape (shapes.py) and each layout, in one run on the same inputs
(float32): the generated C built with -O3 -march=native through cffi (preallocated output;
input and output on page boundaries, see `page_aligned`; 1 thread, and 2 threads through
OpenMP), torch.nn.functional.group_norm (1 and 2 threads, NCHW and channels_last), ONNX
Runtime (GroupNormalization opset 21, else the decomposed graph) and NumPy. Every figure is
the median time per call over many calls after warm-up (the machines are noisy: read ratios).
The one-thread C, PyTorch and the hot floor are timed in turns, round by round, and their
ratios are medians of each round's ratio, so that a neighbour's burst of work slows both sides
of a ratio alike. The floor is the input read once plus the output written once: hot, a copy
of the same bytes (in cache) timed with the rest; cold (caches flushed before every call),
over the copy bandwidth of buffers far beyond the last-level cache.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # shapes.py

from gncodegen.build import STRICT_WARNINGS
from gncodegen.targets.c.runner import build_c_module  # noqa: E402
from gncodegen.plan import lower  # noqa: E402
from gncodegen.targets.c import render_c  # noqa: E402
from gncodegen.targets.c.record import lower_c  # noqa: E402
from gncodegen.pipeline import parse_spec  # noqa: E402

FAST_FLAGS = ("-std=c99", "-O3", "-march=native", "-fPIC", *STRICT_WARNINGS)

from shapes import SHAPES  # noqa: E402  (the reference shapes)
# The hand-written AVX-512 kernel, median us per call, 1 thread, hot caches.
HAND_KERNEL_US = {"A": 2.0, "B": 131, "C": 132, "D": 103, "E": 29, "F": 45}
LAST_LEVEL_CACHE = 32 << 20


@dataclass(frozen=True)
class Case:
    """One benchmark row: a shape in one layout."""

    shape: str
    layout: str          # "NCHW" (channels after batch) or "NHWC" (channels fastest)
    n: int
    c: int
    spatial: tuple[int, ...]
    g: int

    @property
    def numel(self) -> int:
        """Elements of the whole batch."""
        return self.n * self.c * int(np.prod(self.spatial, dtype=np.int64))

    def spec_text(self, threads: int, runtime: bool = False, activation: str = "",
                  skip: bool = False, adaptive: bool = False, training: bool = False) -> str:
        """Return the YAML spec of this case (row-major, PyTorch's order of dimensions);
        runtime: the spatial sizes left to run time (null); activation, skip, adaptive: what
        to fuse; training: with the training entry points."""
        s = "S" * len(self.spatial)
        spatial = ["~"] * len(self.spatial) if runtime else list(self.spatial)
        if not self.spatial:
            fmt, size = "BC", [self.c]
        elif self.layout == "NCHW":
            fmt, size = f"BC{s}", [self.c, *spatial]
        else:
            fmt, size = f"B{s}C", [*spatial, self.c]
        name = (f"bench_{self.shape.lower()}_{self.layout.lower()}_t{threads}"
                f"{'_rt' if runtime else ''}{'_' + activation if activation else ''}"
                f"{'_skip' if skip else ''}{'_ada' if adaptive else ''}"
                f"{'_train' if training else ''}")
        size_text = "[" + ", ".join(map(str, size)) + "]"
        return (f"name: {name}\nnum_groups: {self.g}\nformat: {fmt}\nlayout: row-major\n"
                f"input_size: {size_text}\nthreads: {threads}\n"
                + (f"activation: {activation}\n" if activation else "")
                + ("skip: true\n" if skip else "") + ("adaptive: true\n" if adaptive else "")
                + ("training: true\n" if training else ""))


def cases(shapes: list[str]) -> list[Case]:
    """Return the rows to run: NCHW and NHWC for spatial shapes, one row for E."""
    out = []
    for name in shapes:
        n, c, sp, g = SHAPES[name]
        for layout in (("NCHW", "NHWC") if sp else ("NCHW",)):
            out.append(Case(name, layout, n, c, sp, g))
    return out


def median_us(fn, min_time: float, warmup: int = 3) -> float:
    """Return the median time of one call of fn in microseconds."""
    return timings_us(fn, min_time, warmup)[0]


def calls_per_batch(fn, warmup: int = 3) -> int:
    """Warm fn up and return how many calls make a batch of about 1 ms (the clock's resolution
    then does not matter)."""
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    fn()
    return max(1, int(1e-3 / max(time.perf_counter() - t0, 1e-7)))


def batch_us(fn, calls: int) -> float:
    """Return the time of one call of fn in microseconds, over a batch of calls."""
    t0 = time.perf_counter_ns()
    for _ in range(calls):
        fn()
    return (time.perf_counter_ns() - t0) / calls / 1e3


def timings_us(fn, min_time: float, warmup: int = 3) -> tuple[float, float]:
    """Return the median and the best time of one call of fn in microseconds, over batches of
    about 1 ms for about min_time seconds (at least 5)."""
    calls = calls_per_batch(fn, warmup)
    samples = []
    end = time.perf_counter() + min_time
    while len(samples) < 5 or time.perf_counter() < end:
        samples.append(batch_us(fn, calls))
    return statistics.median(samples), min(samples)


def page_aligned(values: np.ndarray) -> np.ndarray:
    """Return a copy of a float32 array that starts on a 4 KiB boundary.

    Where the output starts relative to the input, modulo 4 KiB, moves the generated C by up
    to a half (NCT F: 51 us when both start on a page, 69 us with the output 64 bytes
    further: the apply sweep's stores alias the next loads in the low 12 address bits), and
    malloc places NumPy's buffers anywhere; on page boundaries every run measures the same case.
    """
    raw = np.empty(values.size * 4 + 4096, dtype=np.uint8)
    start = -raw.ctypes.data % 4096
    out = raw[start:start + values.size * 4].view(np.float32)
    out[:] = values.ravel()
    return out


def interleaved_us(fns: dict, min_time: float, warmup: int = 3) -> dict[str, list[float]]:
    """Return {name: samples of us per call} for callables timed in turns.

    Each round times every callable over a batch of about 1 ms, one after the other, so that
    a busy neighbour slows them alike: ratios taken round by round (`ratio`) hold on a noisy
    machine where medians taken a minute apart do not. Two untimed calls before each batch
    bring the callable's own buffers back into the caches that the others evicted (hot-cache
    figures, as when it runs alone). Only single-threaded callables go in together: an OpenMP
    pool keeps its idle workers spinning for a while after each call, and on a 2-core machine
    they would compete with the next batch.
    Rounds go on for about min_time seconds per callable, and at least 5.
    """
    calls = {name: calls_per_batch(fn, warmup) for name, fn in fns.items()}
    samples: dict[str, list[float]] = {name: [] for name in fns}
    end = time.perf_counter() + min_time * len(fns)
    while len(samples[next(iter(fns))]) < 5 or time.perf_counter() < end:
        for name, fn in fns.items():
            for _ in range(2):          # bring its own buffers back into the caches
                fn()
            samples[name].append(batch_us(fn, calls[name]))
    return samples


def ratio(num: list[float], den: list[float]) -> float:
    """Return the median over rounds of num/den (samples from the same interleaved rounds)."""
    return statistics.median(a / b for a, b in zip(num, den))


def cold_us(fn, flush, repeats: int) -> float:
    """Return the median time of one call right after the caches were flushed."""
    fn()
    samples = []
    for _ in range(repeats):
        flush()
        t0 = time.perf_counter_ns()
        fn()
        samples.append((time.perf_counter_ns() - t0) / 1e3)
    return statistics.median(samples)


class Flusher:
    """Evicts the caches by writing then reading a buffer of 3x the last-level cache."""

    def __init__(self) -> None:
        self.buf = np.ones(3 * LAST_LEVEL_CACHE // 8)

    def __call__(self) -> None:
        self.buf += 1.0


def copy_bandwidth(nbytes: int, min_time: float) -> float:
    """Return bytes moved per second (read + write) by np.copyto on buffers of nbytes."""
    src = np.ones(max(nbytes // 4, 1024), dtype=np.float32)
    dst = np.empty_like(src)
    us = median_us(lambda: np.copyto(dst, src), min_time)
    return 2 * src.nbytes / (us * 1e-6)


def build(case: Case, threads: int, runtime: bool = False, activation: str = "",
          skip: bool = False, adaptive: bool = False, training: bool = False):
    """Return (plan, lib, ffi) of the generated C for a case, built with FAST_FLAGS."""
    spec = parse_spec(case.spec_text(threads, runtime, activation, skip, adaptive, training),
                      Path("."), "bench")
    plan = lower(spec.layers[0])
    sources = list(render_c(plan, "bench.yaml"))
    module = build_c_module((plan,), sources, flags=FAST_FLAGS)
    return plan, module.lib, module.ffi


def torch_runner(torch, x_nchw: np.ndarray, case: Case, threads: int, channels_last: bool):
    """Return a callable running torch group_norm on the case's input.

    channels_last: 4-D tensors in torch.channels_last memory format; 3-D ones (sequences) as a
    (N, C, T) view of an (N, T, C) buffer, the closest PyTorch has.
    """
    t = torch.from_numpy(x_nchw)
    if channels_last and t.dim() == 4:
        t = t.contiguous(memory_format=torch.channels_last)
    elif channels_last:
        t = t.permute(0, 2, 1).contiguous().permute(0, 2, 1)
    w = torch.ones(case.c)
    b = torch.zeros(case.c)
    fn = torch.nn.functional.group_norm

    def run():
        torch.set_num_threads(threads)
        with torch.inference_mode():
            fn(t, case.g, w, b, 1e-5)
    return run


def onnx_session(case: Case, threads: int):
    """Return (session, kind): GroupNormalization-21 if ONNX Runtime runs it, else decomposed."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    shape = [case.n, case.c, *case.spatial]
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    scale = helper.make_tensor("scale", TensorProto.FLOAT, [case.c], [1.0] * case.c)
    bias = helper.make_tensor("bias", TensorProto.FLOAT, [case.c], [0.0] * case.c)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)
    node = helper.make_node("GroupNormalization", ["x", "scale", "bias"], ["y"],
                            epsilon=1e-5, num_groups=case.g)
    model = helper.make_model(helper.make_graph([node], "gn", [x], [y], [scale, bias]),
                              opset_imports=[helper.make_opsetid("", 21)])
    try:
        return ort.InferenceSession(model.SerializeToString(), so,
                                    providers=["CPUExecutionProvider"]), "GN-21"
    except Exception:  # noqa: BLE001 - fall back to the graph opset 18 exporters produce
        pass
    # Decomposed: reshape to (N, G, -1), mean and variance, normalize, scale per channel.
    inits = [helper.make_tensor("gshape", TensorProto.INT64, [3], [case.n, case.g, -1]),
             helper.make_tensor("cshape", TensorProto.INT64, [len(shape)], shape),
             helper.make_tensor("axes", TensorProto.INT64, [1], [2]),
             helper.make_tensor("eps", TensorProto.FLOAT, [], [1e-5]),
             helper.make_tensor("sc", TensorProto.FLOAT, [case.c] + [1] * len(case.spatial),
                                [1.0] * case.c),
             helper.make_tensor("bi", TensorProto.FLOAT, [case.c] + [1] * len(case.spatial),
                                [0.0] * case.c)]
    nodes = [helper.make_node("Reshape", ["x", "gshape"], ["xg"]),
             helper.make_node("ReduceMean", ["xg", "axes"], ["mean"]),
             helper.make_node("Sub", ["xg", "mean"], ["d"]),
             helper.make_node("Mul", ["d", "d"], ["d2"]),
             helper.make_node("ReduceMean", ["d2", "axes"], ["var"]),
             helper.make_node("Add", ["var", "eps"], ["ve"]),
             helper.make_node("Sqrt", ["ve"], ["sd"]),
             helper.make_node("Div", ["d", "sd"], ["z"]),
             helper.make_node("Reshape", ["z", "cshape"], ["zc"]),
             helper.make_node("Mul", ["zc", "sc"], ["zs"]),
             helper.make_node("Add", ["zs", "bi"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "gn", [x], [y], inits),
                              opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    return ort.InferenceSession(model.SerializeToString(), so,
                                providers=["CPUExecutionProvider"]), "decomposed"


def numpy_runner(x_nchw: np.ndarray, case: Case):
    """Return a callable computing group norm with NumPy in float32 (two passes)."""
    xg = x_nchw.reshape(case.n, case.g, -1)

    def run():
        mean = xg.mean(axis=2, keepdims=True)
        d = xg - mean
        var = np.mean(d * d, axis=2, keepdims=True)
        return d / np.sqrt(var + np.float32(1e-5))
    return run


def fmt(v: float | None, digits: int = 1) -> str:
    """Return a table cell: '-' for missing values."""
    if v is None:
        return "-"
    if v >= 100:
        return f"{v:.0f}"
    return f"{v:.{digits}f}"


def runtime_table(shapes: list[str], min_time: float, torch) -> None:
    """Print each shape built with its spatial sizes at run time beside the fixed-size build,
    PyTorch (1 thread) and the hot floor, timed in turns in one run."""
    rows = [["shape", "layout", "C fixed", "C runtime", "runtime/fixed", "torch 1t",
             "torch/runtime", "floor hot", "runtime/floor", "runtime kernel"]]
    rng = np.random.default_rng(0)
    for case in cases(shapes):
        if not case.spatial:
            continue                     # E has no spatial size to leave to run time
        x_nchw = rng.standard_normal((case.n, case.c, *case.spatial)).astype(np.float32)
        x = page_aligned(np.moveaxis(x_nchw, 1, -1).copy() if case.layout == "NHWC"
                         else x_nchw)
        y = page_aligned(np.zeros_like(x))
        fns = {}
        kinds = {}
        for label, runtime in (("fixed", False), ("runtime", True)):
            plan, lib, ffi = build(case, 1, runtime)
            px, py = ffi.from_buffer("float[]", x), ffi.from_buffer("float[]", y)
            fn = getattr(lib, f"{plan.prefix}_predict")
            args = (px, py, case.n, *(case.spatial if runtime else ()))
            fns[label] = (lambda f=fn, a=args: f(*a))
            kinds[label] = lower_c(plan).kernel.kind
        copy_src, copy_dst = page_aligned(np.ones_like(x)), page_aligned(np.zeros_like(x))
        fns["copy"] = lambda: np.copyto(copy_dst, copy_src)
        if torch is not None:
            torch.set_num_threads(1)
            fns["torch"] = torch_runner(torch, x_nchw, case, 1, case.layout == "NHWC")
        t = interleaved_us(fns, min_time)
        med = {k: statistics.median(v) for k, v in t.items()}
        rows.append([case.shape, case.layout, fmt(med["fixed"]), fmt(med["runtime"]),
                     fmt(ratio(t["runtime"], t["fixed"]), 2),
                     fmt(med.get("torch")), fmt(ratio(t["torch"], t["runtime"]), 2)
                     if torch is not None else "-", fmt(med["copy"]),
                     fmt(ratio(t["runtime"], t["copy"]), 2), kinds["runtime"]])
        print("  ".join(rows[-1]), file=sys.stderr, flush=True)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
    print("# runtime: the spatial sizes as size_t arguments (input_size entries ~); "
          "runtime/fixed: goal <= 1.15; medians of the interleaved rounds' ratios")


# What --fused takes beyond activation names: the skip, the modulation, and both with swish
# (a diffusion block), as (activation, skip, adaptive).
FUSIONS = {"skip": ("", True, False), "adaptive": ("", False, True),
           "diffusion": ("swish", True, True)}


def fused_table(shapes: list[str], min_time: float, torch, fusions: list[str]) -> None:
    """Print each shape with a fusion beside the same layer without it (the fusion's own cost),
    PyTorch running the same as separate ops (the add, group norm, the modulation, the
    activation), and the hot floor, timed in turns in one run. The floor moves the bytes the
    fused layer must: a copy of x, or with a skip x + skip into y (np.add)."""
    rows = [["shape", "layout", "fusion", "C plain", "C fused", "fused/plain", "torch ops",
             "torch/fused", "fused/floor", "plain/copy"]]
    rng = np.random.default_rng(0)
    for case in cases(shapes):
        x_nchw = rng.standard_normal((case.n, case.c, *case.spatial)).astype(np.float32)
        k_nchw = rng.standard_normal(x_nchw.shape).astype(np.float32)

        def ours(v):
            return page_aligned(np.moveaxis(v, 1, -1).copy() if case.layout == "NHWC" else v)
        x, skip = ours(x_nchw), ours(k_nchw)
        y = page_aligned(np.zeros_like(x))
        gain = page_aligned(rng.normal(0.0, 0.5, (case.n, case.c)).astype(np.float32))
        shift = page_aligned(rng.normal(0.0, 0.5, (case.n, case.c)).astype(np.float32))
        plan, lib, ffi = build(case, 1)
        px, py = ffi.from_buffer("float[]", x), ffi.from_buffer("float[]", y)
        plain = getattr(lib, f"{plan.prefix}_predict")
        copy_src, copy_dst = page_aligned(np.ones_like(x)), page_aligned(np.zeros_like(x))
        for token in fusions:
            act, with_skip, with_ada = FUSIONS.get(token, (token, False, False))
            fplan, flib, fffi = build(case, 1, activation=act, skip=with_skip,
                                      adaptive=with_ada)
            buf = lambda a: fffi.from_buffer("float[]", a)   # noqa: E731
            extra = ((buf(skip), fffi.NULL) if with_skip else ()) + (
                (buf(gain), buf(shift)) if with_ada else ())
            fx, fy = buf(x), buf(y)
            fused = getattr(flib, f"{fplan.prefix}_predict")
            fns = {"plain": lambda f=plain: f(px, py, case.n),
                   "fused": lambda f=fused, e=extra: f(fx, fy, case.n, *e),
                   "copy": lambda: np.copyto(copy_dst, copy_src)}
            if with_skip:
                fns["floor"] = lambda: np.add(x, skip, out=copy_dst)
            if torch is not None:
                torch.set_num_threads(1)
                t_in, t_skip = torch.from_numpy(x_nchw), torch.from_numpy(k_nchw)
                shape = (case.n, case.c) + (1,) * len(case.spatial)
                t_gain = torch.from_numpy(gain).reshape(shape)
                t_shift = torch.from_numpy(shift).reshape(shape)
                if case.layout == "NHWC":
                    t_in, t_skip = (torch_runner_input(torch, v) for v in (x_nchw, k_nchw))
                f_act = {"": None, "relu": torch.relu, "swish": torch.nn.functional.silu,
                         "sigmoid": torch.sigmoid, "tanh": torch.tanh,
                         "gelu": torch.nn.functional.gelu}[act]

                def ops(t=t_in, k=t_skip, fa=f_act, sk=with_skip, ad=with_ada):
                    with torch.inference_mode():
                        z = torch.nn.functional.group_norm(t + k if sk else t, case.g, None,
                                                           None, 1e-5)
                        if ad:
                            z = z * (1 + t_gain) + t_shift
                        if fa is not None:
                            z = fa(z)
                fns["torch"] = ops
            t = interleaved_us(fns, min_time)
            med = {k: statistics.median(v) for k, v in t.items()}
            floor = t["floor"] if with_skip else t["copy"]
            rows.append([case.shape, case.layout, token, fmt(med["plain"]), fmt(med["fused"]),
                         fmt(ratio(t["fused"], t["plain"]), 2), fmt(med.get("torch")),
                         fmt(ratio(t["torch"], t["fused"]), 2) if torch is not None else "-",
                         fmt(ratio(t["fused"], floor), 2), fmt(ratio(t["plain"], t["copy"]), 2)])
            print("  ".join(rows[-1]), file=sys.stderr, flush=True)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
    print("# fused/plain: what the fusion costs in the fused kernel (goal <= 1.1 for an "
          "activation; a skip also reads a second tensor); torch/fused: PyTorch's separate ops "
          "(goal >= 1.5); fused/floor beside plain/copy: each against the bytes it must move")


def train_table(shapes: list[str], min_time: float, torch) -> None:
    """Print each shape's training step: the generated forward_train and backward (one thread)
    beside PyTorch's forward and autograd backward of group_norm (one thread, the weight and
    bias requiring gradients), and each beside its floor, timed in turns in one run. The
    floors move the bytes each must: forward_train a copy of x into y, backward x and dy read
    and dx written (np.add(x, dy, out=dx))."""
    rows = [["shape", "layout", "C fwd", "C bwd", "C step", "torch step", "torch/C",
             "bwd floor", "bwd/floor", "step/floor"]]
    rng = np.random.default_rng(0)
    for case in cases(shapes):
        x_nchw = rng.standard_normal((case.n, case.c, *case.spatial)).astype(np.float32)
        dy_nchw = rng.standard_normal(x_nchw.shape).astype(np.float32)

        def ours(v):
            return page_aligned(np.moveaxis(v, 1, -1).copy() if case.layout == "NHWC" else v)
        x, dy = ours(x_nchw), ours(dy_nchw)
        y, dx = page_aligned(np.zeros_like(x)), page_aligned(np.zeros_like(x))
        stats = np.zeros(case.n * case.g, dtype=np.float32)
        mean, rstd = stats.copy(), stats.copy()
        params = [np.zeros(case.c, dtype=np.float32) for _ in range(2)]
        scale, offset = np.ones(case.c, dtype=np.float32), params[0].copy()
        dscale, doffset = params[0].copy(), params[1].copy()
        plan, lib, ffi = build(case, 1, training=True)
        buf = lambda a: ffi.from_buffer("float[]", a)   # noqa: E731
        px, py, pdy, pdx = buf(x), buf(y), buf(dy), buf(dx)
        pm, pr, ps, po, pds, pdo = (buf(a) for a in (mean, rstd, scale, offset, dscale,
                                                      doffset))
        fwd = getattr(lib, f"{plan.prefix}_forward_train")
        bwd = getattr(lib, f"{plan.prefix}_backward")
        fwd(px, py, case.n, ps, po, pm, pr)
        copy_dst = page_aligned(np.zeros_like(x))
        fns = {"fwd": lambda: fwd(px, py, case.n, ps, po, pm, pr),
               "bwd": lambda: bwd(px, pdy, pdx, pds, pdo, case.n, ps, po, pm, pr),
               "step": lambda: (fwd(px, py, case.n, ps, po, pm, pr),
                                bwd(px, pdy, pdx, pds, pdo, case.n, ps, po, pm, pr)),
               "copy": lambda: np.copyto(copy_dst, x),
               "bwd floor": lambda: np.add(x, dy, out=copy_dst)}
        if torch is not None:
            torch.set_num_threads(1)
            t_x = (torch_runner_input(torch, x_nchw) if case.layout == "NHWC"
                   else torch.from_numpy(x_nchw)).clone().requires_grad_(True)
            t_dy = (torch_runner_input(torch, dy_nchw) if case.layout == "NHWC"
                    else torch.from_numpy(dy_nchw))
            t_w = torch.ones(case.c, requires_grad=True)
            t_b = torch.zeros(case.c, requires_grad=True)

            def torch_step():
                out = torch.nn.functional.group_norm(t_x, case.g, t_w, t_b, 1e-5)
                out.backward(t_dy)
                t_x.grad = t_w.grad = t_b.grad = None
            fns["torch"] = torch_step
        t = interleaved_us(fns, min_time)
        med = {k: statistics.median(v) for k, v in t.items()}
        step_floor = [a + b for a, b in zip(t["copy"], t["bwd floor"])]
        rows.append([case.shape, case.layout, fmt(med["fwd"]), fmt(med["bwd"]),
                     fmt(med["step"]), fmt(med.get("torch")),
                     fmt(ratio(t["torch"], t["step"]), 2) if torch is not None else "-",
                     fmt(med["bwd floor"]), fmt(ratio(t["bwd"], t["bwd floor"]), 2),
                     fmt(ratio(t["step"], step_floor), 2)])
        print("  ".join(rows[-1]), file=sys.stderr, flush=True)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
    print("# C step: forward_train + backward; torch/C: PyTorch's forward + backward over it "
          "(goal >= 2); bwd/floor: backward over reading x, dy and writing dx (goal <= 1.3); "
          "step/floor: the step over a copy plus that")


def torch_runner_input(torch, v: np.ndarray):
    """Return an NCHW array as PyTorch's channels-last tensor (a sequence as an (N, T, C)
    buffer seen as (N, C, T))."""
    t = torch.from_numpy(v)
    if t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    return t.permute(0, 2, 1).contiguous().permute(0, 2, 1)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print its table; return the exit status."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated, e.g. A,B")
    ap.add_argument("--quick", action="store_true", help="short timings (for tests)")
    ap.add_argument("--no-others", action="store_true",
                    help="time only the generated C (no PyTorch/ONNX Runtime/NumPy)")
    ap.add_argument("--runtime-sizes", action="store_true",
                    help="time each shape with its spatial sizes given at run time beside the "
                         "fixed-size build and PyTorch, instead of the main table")
    ap.add_argument("--train", action="store_true",
                    help="time each shape's training step (forward_train + backward) beside "
                         "PyTorch's forward + backward and the floors, instead of the main "
                         "table")
    ap.add_argument("--fused", default="",
                    help="time each shape with these fused (activations such as relu,swish, "
                         "and skip, adaptive, diffusion) beside the plain layer and PyTorch's "
                         "separate ops, instead of the main table")
    args = ap.parse_args(argv)
    shapes = [s.strip().upper() for s in args.shapes.split(",") if s.strip()]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        ap.error(f"unknown shape {unknown[0]} (choose from {', '.join(SHAPES)})")
    min_time = 0.05 if args.quick else 0.4
    cold_repeats = 3 if args.quick else 15

    torch = None
    if not args.no_others:
        import torch as _torch
        torch = _torch
    if args.runtime_sizes:
        runtime_table(shapes, min_time, torch)
        return 0
    if args.train:
        train_table(shapes, min_time, torch)
        return 0
    if args.fused:
        fused_table(shapes, min_time, torch, [a.strip() for a in args.fused.split(",")])
        return 0
    flusher = Flusher()
    dram_bw = copy_bandwidth(4 * LAST_LEVEL_CACHE, min_time)
    print(f"# cpu: {os.cpu_count()} cores; copy bandwidth beyond the last-level cache "
          f"{dram_bw / 1e9:.1f} GB/s (read + write)")
    print(f"# generated C: cc {' '.join(FAST_FLAGS[:4])}; times are medians in us per call")
    header = ["shape", "layout", "C 1t", "GB/s", "C 2t", "1->2t", "best 1->2t", "torch 1t",
              "torch 2t",
              "ORT", "NumPy", "torch1t/C", "hand", "C/hand", "floor hot", "C/floor", "C cold",
              "floor cold", "cold/floor"]
    rows = [header]
    ort_kinds = set()
    rng = np.random.default_rng(0)
    for case in cases(shapes):
        x_nchw = rng.standard_normal((case.n, case.c, *case.spatial)).astype(np.float32)
        if case.layout == "NHWC":
            x = page_aligned(np.moveaxis(x_nchw, 1, -1).copy())
        else:
            x = page_aligned(x_nchw)
        y = page_aligned(np.zeros_like(x))
        nbytes = 2 * x.nbytes
        runs = {}
        for threads in (1, 2):
            plan, lib, ffi = build(case, threads)
            px, py = ffi.from_buffer("float[]", x), ffi.from_buffer("float[]", y)
            fn = getattr(lib, f"{plan.prefix}_predict")
            runs[threads] = (lambda f=fn, a=px, b=py: f(a, b, case.n))
        c_cold = cold_us(runs[1], flusher, cold_repeats)
        # One thread: the C, PyTorch and the hot floor (a copy of the same bytes, in cache) in
        # the same rounds; then the two-thread runs, each on its own.
        copy_src = page_aligned(np.ones_like(x))
        copy_dst = page_aligned(np.zeros_like(x))
        fns = {"c1": runs[1], "copy": lambda: np.copyto(copy_dst, copy_src)}
        last = case.layout == "NHWC"
        if torch is not None:
            fns["torch1"] = torch_runner(torch, x_nchw, case, 1, last)
        t = interleaved_us(fns, min_time)
        c1, floor_hot = statistics.median(t["c1"]), statistics.median(t["copy"])
        c2, best2 = timings_us(runs[2], min_time)
        floor_cold = nbytes / dram_bw * 1e6
        t1 = t2 = ort_us = np_us = None
        if torch is not None:
            t1 = statistics.median(t["torch1"])
            t2 = median_us(torch_runner(torch, x_nchw, case, 2, last), min_time)
            torch.set_num_threads(1)
            if case.layout == "NCHW":
                try:
                    sess, kind = onnx_session(case, 1)
                    ort_kinds.add(kind)
                    feed = {"x": x_nchw}
                    ort_us = median_us(lambda: sess.run(None, feed), min_time)
                except ImportError:
                    ort_us = None
                np_us = median_us(numpy_runner(x_nchw, case), min_time)
        hand = HAND_KERNEL_US[case.shape]
        rows.append([case.shape, case.layout, fmt(c1), fmt(nbytes / (c1 * 1e3)), fmt(c2),
                     fmt(c1 / c2, 2), fmt(min(t["c1"]) / best2, 2),
                     fmt(t1), fmt(t2), fmt(ort_us), fmt(np_us),
                     fmt(ratio(t["torch1"], t["c1"]) if t1 else None, 2), fmt(hand),
                     fmt(c1 / hand, 2), fmt(floor_hot), fmt(ratio(t["c1"], t["copy"]), 2),
                     fmt(c_cold), fmt(floor_cold), fmt(c_cold / floor_cold, 2)])
        print("  ".join(rows[-1]), file=sys.stderr, flush=True)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for r in rows:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
    if ort_kinds:
        print(f"# ONNX Runtime graph: {', '.join(sorted(ort_kinds))} (NCHW only: ONNX is NCHW)")
    print("# best 1->2t: the same from the fastest batch of calls (a busy second core spoils "
          "medians on shared machines)")
    print("# 1->2t: C 1t / C 2t; torch1t/C: PyTorch 1 thread over the C (goal >= 2.5); "
          "C/hand: over the issue's AVX-512 kernel (goal <= 1.1); cold/floor: goal <= 1.3")
    print("# C 1t, torch 1t and the hot floor (a copy of the same bytes) are timed in turns, "
          "round by round; torch1t/C and C/floor are medians of the rounds' ratios")
    return 0


if __name__ == "__main__":
    sys.exit(main())
