#!/usr/bin/env python3
"""GPU benchmark of the generated CUDA against torch.nn.functional.group_norm.

    python3 benchmarks/bench_cuda.py                       # every shape, both layouts, fp32+fp16
    python3 benchmarks/bench_cuda.py --shapes B,C --dtypes fp32 --reps 30

For each reference shape (shapes.py), in NCHW and channels-last, in fp32 and fp16, in
one run on the same inputs: the generated `<name>_cuda_predict_with_params` (built with nvcc for
this GPU, called through ctypes on PyTorch's stream and tensors) and torch's group_norm. Every
figure is the median over --reps calls, each timed with CUDA events after the L2 cache was
flushed (so the input comes from HBM as it would inside a network). The floor is the input read
once plus the output written once over the bandwidth of a large device-to-device copy measured
in the same run; "copy" is a same-size torch copy (the floor plus a launch's fixed cost), and "% copy" says
how close the generated kernel comes to it.

The "pl" (pipelined) columns time the same calls back to back in one CUDA graph instead, each
on its own copy of the input (copies enough to pass three times the L2's size, so inputs still
come from HBM), as a network's kernels run: each launch's fixed cost then overlaps the previous
kernel, and "% floor pl" compares what is left with the floor.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # shapes.py

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from gncodegen.targets.cuda.lower import MAX_CLUSTER, CudaOptions, chosen_variant, lower_cuda  # noqa: E402
from gncodegen.targets.cuda.render import render_cuda  # noqa: E402
from gncodegen.targets.cuda.runner import NVCC_FLAGS  # noqa: E402
from gncodegen.plan import lower  # noqa: E402
from gncodegen.pipeline import parse_spec  # noqa: E402

from shapes import SHAPES  # noqa: E402  (the reference shapes)
DTYPES = {"fp32": ("single", torch.float32), "fp16": ("half", torch.float16)}
EPS = 1e-5


@dataclass(frozen=True)
class Row:
    """One benchmark configuration."""

    shape: str
    layout: str        # NCHW or NHWC (channels last)
    dtype: str         # fp32 or fp16
    n: int
    c: int
    spatial: tuple[int, ...]
    g: int

    @property
    def name(self) -> str:
        """The layer name (a C identifier)."""
        return f"bench_{self.shape}_{self.layout}_{self.dtype}".lower()

    def spec_text(self) -> str:
        """Return the layer's spec: row-major, B first, channels second or last."""
        k = len(self.spatial)
        reduced = "T" if self.shape == "F" else "S" * k
        if self.layout == "NCHW":
            fmt, size = "BC" + reduced, [self.c, *self.spatial]
        else:
            fmt, size = "B" + reduced + "C", [*self.spatial, self.c]
        return (f"name: {self.name}\nnum_groups: {self.g}\nformat: {fmt}\nlayout: row-major\n"
                f"input_size: {size}\ndtype: {DTYPES[self.dtype][0]}\nepsilon: {EPS}\n"
                "cuda_arch: [90]\n")


def rows(shapes: list[str], dtypes: list[str]) -> list[Row]:
    """Return every configuration; a shape without spatial dims has one layout only."""
    out = []
    for s in shapes:
        n, c, spatial, g = SHAPES[s]
        for layout in ("NCHW", "NHWC") if spatial else ("NCHW",):
            for dt in dtypes:
                out.append(Row(s, layout, dt, n, c, spatial, g))
    return out


def build(row: Row, folder: Path, arch: str, max_cluster: int = MAX_CLUSTER) -> tuple[Path, object]:
    """Render and compile one configuration into a shared library; return it and its CudaPlan."""
    layer = parse_spec(row.spec_text(), base_dir=folder, stem=row.name).layers[0]
    plan = lower(layer)
    cp = lower_cuda(plan, CudaOptions(max_cluster=max_cluster))
    sub = folder / f"k{max_cluster}"
    sub.mkdir(exist_ok=True)
    for src in render_cuda(plan, "bench_cuda.py", cuda_plan=cp):
        (sub / src.name).write_text(src.text)
    lib = sub / f"lib{row.name}.so"
    cmd = ["nvcc", *NVCC_FLAGS, f"-arch={arch}", "-Xcompiler", "-fPIC", "-shared", "-I.",
           f"{row.name}.cu", "-o", lib.name]
    proc = subprocess.run(cmd, cwd=sub, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}\n{proc.stderr}")
    return lib, cp


def median_us(fn, reps: int, flush: torch.Tensor) -> float:
    """Return the median time of fn() in microseconds, L2 flushed before each call.

    The flush reads a buffer twice the L2's size, so the cache holds clean lines of it and the
    timed call pays no write-back of someone else's data.
    """
    for _ in range(3):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        flush.sum()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) * 1000.0 for s, e in zip(starts, ends))


def pipelined_us(calls: list, rounds: int = 5) -> float:
    """Return the time per call, in microseconds, of `calls` (each taking the stream to launch
    on) captured back to back in one CUDA graph and replayed: the median over rounds.

    A graph keeps the host out of it (ctypes and torch's dispatcher would otherwise feed the
    GPU slower than it runs small kernels). NaN, with the reason printed, when capture fails.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    try:
        with torch.cuda.stream(side):                 # warm up outside the capture
            for call in calls:
                call(side)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            capture = torch.cuda.current_stream()
            for call in calls:
                call(capture)
        graph.replay()
        torch.cuda.synchronize()
    except RuntimeError as exc:
        print(f"  (graph capture failed: {str(exc).splitlines()[0]})", flush=True)
        return float("nan")
    times = []
    for _ in range(rounds):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000.0 / len(calls))
    del graph
    return statistics.median(times)


def replica_count(x: torch.Tensor, l2_bytes: int, cap_bytes: int = 1 << 30) -> int:
    """Copies of x (and of its output) whose inputs together pass three L2s, within cap_bytes."""
    nbytes = x.numel() * x.element_size()
    return max(2, min(-(-3 * l2_bytes // nbytes), cap_bytes // (2 * nbytes)))


def copy_bandwidth(flush: torch.Tensor) -> float:
    """Return device-to-device copy bandwidth in bytes/s (bytes read plus bytes written)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    us = median_us(lambda: dst.copy_(src), 15, flush)
    return 2 * (1 << 30) / (us * 1e-6)


def tensors(row: Row):
    """Return x, an empty y in the same layout, weight and bias, all on the GPU."""
    torch.manual_seed(0)
    dt = DTYPES[row.dtype][1]
    shape = (row.n, row.c, *row.spatial)
    if row.layout == "NCHW":
        x = torch.randn(shape, device="cuda").mul_(2).add_(0.5).to(dt)
    else:  # channels in memory fastest: permute a (N, *spatial, C) buffer
        k = len(row.spatial)
        x = (torch.randn((row.n, *row.spatial, row.c), device="cuda").mul_(2).add_(0.5).to(dt)
             .permute(0, k + 1, *range(1, k + 1)))
    y = torch.empty_strided(x.shape, x.stride(), dtype=dt, device="cuda")
    w = (torch.rand(row.c, device="cuda") + 0.5).to(dt)
    b = torch.randn(row.c, device="cuda").to(dt)
    return x, y, w, b


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--dtypes", default="fp32,fp16")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--json", type=Path, help="also write the rows as JSON here")
    ap.add_argument("--cluster-sweep", default="",
                    help="also time the generated kernels planned with these cluster limits, "
                         "e.g. 1,2,4 (1: no clusters), in a second table")
    args = ap.parse_args()

    props = torch.cuda.get_device_properties(0)
    arch = f"sm_{props.major}{props.minor}"
    config = rows(args.shapes.split(","), args.dtypes.split(","))
    flush = torch.ones(64 << 20, dtype=torch.float32, device="cuda")     # 256 MB
    bandwidth = copy_bandwidth(flush)
    l2_bytes = getattr(props, "L2_cache_size", 0) or (50 << 20)
    print(f"device: {props.name}, {props.multi_processor_count} SMs; copy bandwidth "
          f"{bandwidth / 1e12:.2f} TB/s (read + write); torch {torch.__version__}; "
          f"median of {args.reps} calls, L2 flushed before each", flush=True)

    with tempfile.TemporaryDirectory(prefix="gn-bench-") as tmp:
        folder = Path(tmp)
        with ThreadPoolExecutor(8) as pool:
            built = list(pool.map(lambda r: build(r, folder, arch), config))
        stream = torch.cuda.current_stream()
        results = []
        for row, (lib_path, cp) in zip(config, built):
            lib = ctypes.CDLL(str(lib_path))
            fn = getattr(lib, f"{row.name}_cuda_predict_with_params")
            fn.restype = ctypes.c_int
            fn.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_size_t] + [ctypes.c_void_p] * 3
            x, y, w, b = tensors(row)
            args_ = (x.data_ptr(), y.data_ptr(), row.n, w.data_ptr(), b.data_ptr(),
                     stream.cuda_stream)

            def ours():
                rc = fn(*args_)
                if rc != 0:
                    raise RuntimeError(f"{row.name}: cudaError {rc}")

            def theirs():
                return F.group_norm(x, row.g, w, b, EPS)

            ours()
            ref = theirs().float()
            err = (y.float() - ref).abs().max().item() / ref.abs().max().item()
            copy_dst = torch.empty_like(x)
            t_ours = median_us(ours, args.reps, flush)
            t_torch = median_us(theirs, args.reps, flush)
            t_copy = median_us(lambda: copy_dst.copy_(x), args.reps, flush)
            # Back to back in a graph, each call on its own input copy (module docstring).
            count = replica_count(x, l2_bytes)
            xs = [x.clone() for _ in range(count)]
            ys = [torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="cuda")
                  for _ in range(count)]

            def ours_on(xi, yi):
                def call(st):
                    rc = fn(xi.data_ptr(), yi.data_ptr(), row.n, w.data_ptr(), b.data_ptr(),
                            st.cuda_stream)
                    if rc != 0:
                        raise RuntimeError(f"{row.name}: cudaError {rc}")
                return call

            p_ours = pipelined_us([ours_on(xi, yi) for xi, yi in zip(xs, ys)])
            p_torch = pipelined_us([(lambda st, xi=xi: F.group_norm(xi, row.g, w, b, EPS))
                                    for xi in xs])
            p_copy = pipelined_us([(lambda st, xi=xi, yi=yi: yi.copy_(xi))
                                   for xi, yi in zip(xs, ys)])
            del xs, ys
            nbytes = 2 * x.numel() * x.element_size()
            floor = nbytes / bandwidth * 1e6
            v = chosen_variant(cp, row.n, props.major, props.multi_processor_count)
            kernel = (f"{v.strategy}" + (f" x{v.cluster}" if v.cluster > 1 else "")
                      + (f", {v.team_groups} groups/team" if v.team_groups > 1 else "")
                      + (f", {v.chunks} chunks/group" if v.chunks > 1 else ""))
            results.append(dict(shape=row.shape, layout=row.layout, dtype=row.dtype,
                                mbytes=nbytes / 1e6, floor_us=floor, copy_us=t_copy,
                                ours_us=t_ours, torch_us=t_torch, of_floor=floor / t_ours,
                                of_copy=t_copy / t_ours,
                                vs_torch=t_torch / t_ours, kernel=kernel, rel_err=err,
                                pl_ours_us=p_ours, pl_torch_us=p_torch, pl_copy_us=p_copy,
                                pl_of_floor=floor / p_ours, pl_vs_torch=p_torch / p_ours))
            print(f"  {row.shape} {row.layout} {row.dtype}: ours {t_ours:.1f} us, torch "
                  f"{t_torch:.1f} us ({kernel}; max diff vs torch {err:.1e})", flush=True)

    head = (f"{'shape':<5} {'layout':<6} {'dtype':<5} {'MB':>6} {'floor us':>9} {'copy us':>8} "
            f"{'ours us':>8} {'torch us':>9} {'% floor':>8} {'% copy':>7} {'x torch':>8} "
            f"{'pl copy':>8} {'pl ours':>8} {'pl torch':>9} {'% floor pl':>11} {'x torch pl':>11}"
            "  kernel")
    print()
    print(head)
    print("-" * len(head))
    for r in results:
        print(f"{r['shape']:<5} {r['layout']:<6} {r['dtype']:<5} {r['mbytes']:6.2f} "
              f"{r['floor_us']:9.2f} {r['copy_us']:8.2f} {r['ours_us']:8.2f} {r['torch_us']:9.2f} "
              f"{100 * r['of_floor']:7.0f}% {100 * r['of_copy']:6.0f}% {r['vs_torch']:7.2f}x "
              f"{r['pl_copy_us']:8.2f} {r['pl_ours_us']:8.2f} {r['pl_torch_us']:9.2f} "
              f"{100 * r['pl_of_floor']:10.0f}% {r['pl_vs_torch']:10.2f}x  {r['kernel']}")
    if args.cluster_sweep:
        limits = [int(k) for k in args.cluster_sweep.split(",")]
        print(f"\ngenerated kernels planned with other cluster limits (us; default {MAX_CLUSTER})")
        print(f"{'shape':<5} {'layout':<6} {'dtype':<5} " + " ".join(f"{'k<=' + str(k):>14}" for k in limits))
        with tempfile.TemporaryDirectory(prefix="gn-bench-") as tmp:
            folder = Path(tmp)
            jobs = [(r, k) for r in config for k in limits]
            with ThreadPoolExecutor(8) as pool:
                libs = list(pool.map(lambda rk: build(rk[0], folder, arch, rk[1]), jobs))
            stream = torch.cuda.current_stream()
            for i, row in enumerate(config):
                cells = []
                x, y, w, b = tensors(row)
                for j, k in enumerate(limits):
                    lib_path, cp = libs[i * len(limits) + j]
                    fn = getattr(ctypes.CDLL(str(lib_path)), f"{row.name}_cuda_predict_with_params")
                    fn.restype = ctypes.c_int
                    fn.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_size_t] + [ctypes.c_void_p] * 3
                    a = (x.data_ptr(), y.data_ptr(), row.n, w.data_ptr(), b.data_ptr(),
                         stream.cuda_stream)
                    t = median_us(lambda: fn(*a), args.reps, flush)
                    v = chosen_variant(cp, row.n, props.major, props.multi_processor_count)
                    cells.append(f"{t:6.2f} {v.strategy[:4]}x{v.cluster}")
                print(f"{row.shape:<5} {row.layout:<6} {row.dtype:<5} " + " ".join(f"{c:>14}" for c in cells),
                      flush=True)
    if args.json:
        args.json.write_text(json.dumps(dict(device=props.name, bandwidth=bandwidth,
                                             rows=results), indent=1))


if __name__ == "__main__":
    main()
