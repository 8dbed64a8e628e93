"""Building and running the CUDA target: on a GPU with nvcc, or on the host under emulation.

The generated `.cu` is compiled unchanged either way. Under emulation g++ compiles it against
the stand-in CUDA headers in the emulation folder beside this module (one host thread per CUDA
thread); with
`tsan=True` the same build is instrumented by ThreadSanitizer. A small test driver
(templates/cuda/harness.cu.j2) runs one call per process on files of raw elements.
Builds are cached by content: sources, flags and the compiler's version.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ... import __version__
from ...dtypes import DTYPES
from ...build import cache_root, compiler_version, content_key, run_compiler, staged_entry
from ...errors import BuildError, TargetUnavailable
from ...plan import Plan
from ...render import Source, render_template
from ...verify import Case, CaseResult, Runner
from ...verify_train import SolverInputs, SolverRunner, TrainCase, TrainOutputs, TrainRunner
from .lower import CudaPlan

# g++ ignores nvcc's `#pragma unroll`, and its maybe-uninitialized analysis cannot see that a
# register array is read under the same bound check that filled it.
EMULATION_FLAGS = ("-std=c++17", "-O1", "-g", "-pthread", "-fno-strict-aliasing", "-Wall",
                   "-Wextra", "-Wno-unknown-pragmas", "-Wno-maybe-uninitialized", "-Werror")
TSAN_FLAGS = ("-fsanitize=thread",)
NVCC_FLAGS = ("-std=c++17", "-O3", "-Xcompiler", "-Wall,-Wextra", "-Werror", "all-warnings")


def emulation_include() -> Path:
    """Return the folder of the stand-in CUDA headers for the host emulation."""
    return Path(__file__).resolve().parent / "emulation"


def gencode_flags(archs: tuple[int, ...]) -> list[str]:
    """Return nvcc -gencode flags: machine code per arch, PTX of the newest for later GPUs."""
    flags = []
    for a in archs:
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    flags += ["-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]
    return flags


@functools.lru_cache(maxsize=1)
def gpu_name() -> str | None:
    """Return the first NVIDIA GPU's name when one is present and nvcc can build for it."""
    if shutil.which("nvidia-smi") is None or shutil.which("nvcc") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    names = [line.strip() for line in out.stdout.splitlines() if line.strip()]
    return names[0] if out.returncode == 0 and names else None


def harness_source(plan: Plan, cp: CudaPlan) -> Source:
    """Return the test driver for one layer."""
    return Source(f"{plan.prefix}_harness.cu",
                  render_template("cuda/harness.cu.j2", plan=plan, cp=cp))


def train_harness_source(plan: Plan, cp: CudaPlan) -> Source:
    """Return the training test driver for one training layer."""
    return Source(f"{plan.prefix}_train_harness.cu",
                  render_template("cuda/train_harness.cu.j2", plan=plan, cp=cp))


def build_harness(plan: Plan, cp: CudaPlan, sources: list[Source], mode: str = "emulation",
                  keep: bool = False, harness: Source | None = None) -> Path:
    """Return the path of a built test driver for one layer (mode: emulation, tsan or gpu):
    the predict driver, or the one given (the training driver)."""
    names = {f"{plan.prefix}.cu", f"{plan.prefix}_cuda.h"}
    own = [s for s in sources if s.name in names]
    if len(own) != 2:
        raise BuildError(plan.prefix, [], f"sources {sorted(names)} not rendered")
    harness = harness or harness_source(plan, cp)
    files = [*own, harness]
    if mode in ("emulation", "tsan"):
        cc = "g++"
        flags = [*EMULATION_FLAGS, *(TSAN_FLAGS if mode == "tsan" else ())]
        emu = emulation_include()
        emu_text = "".join(p.read_text() for p in sorted(emu.glob("*.h")))
        commands = [[cc, *flags, f"-I{emu}", "-I.", "-x", "c++", f"{plan.prefix}.cu",
                     "-x", "c++", harness.name, "-o", "harness"]]
    elif mode == "gpu":
        cc = "nvcc"
        flags = [*NVCC_FLAGS, *gencode_flags(cp.archs)]
        emu_text = ""
        commands = [[cc, *flags, "-I.", f"{plan.prefix}.cu", harness.name, "-o", "harness"]]
    else:
        raise ValueError(mode)
    key = content_key([__version__, mode, compiler_version(cc), " ".join(commands[0]), emu_text,
                   *(f"{s.name}\n{s.text}" for s in files)])
    folder = cache_root() / f"cuda-{key}"
    exe = folder / "harness"
    if not exe.is_file():
        with staged_entry(folder, exe.name) as work:
            for s in files:
                (work / s.name).write_text(s.text)
            for cmd in commands:
                run_compiler(f"{plan.prefix} ({mode})", cmd, cwd=work)
    if keep:
        print(f"build folder: {folder}")
    return exe


# --------------------------------------------------------------------------- element bits


def to_bits(values: np.ndarray, dtype: str) -> bytes:
    """Return values (already representable in dtype) as the dtype's raw bytes."""
    return np.ascontiguousarray(values, dtype=DTYPES[dtype].numpy).tobytes()


def from_bits(raw: bytes, dtype: str) -> np.ndarray:
    """Return a dtype's raw bytes as an array of that dtype (writable)."""
    return np.frombuffer(bytearray(raw), dtype=DTYPES[dtype].numpy)


@dataclass(frozen=True)
class CallResult:
    """What one driver run printed and returned."""

    returncode: int
    stdout: str
    stderr: str
    y: np.ndarray | None
    sum: np.ndarray | None = None   # a skip layer's x + skip, where the call asked for it


def run_call(exe: Path, plan: Plan, mode: str, batch: int, x: np.ndarray,
             scale: np.ndarray | None = None, offset: np.ndarray | None = None,
             env: dict | None = None, timeout: float = 600,
             sizes: tuple[int, ...] = (), fusion: dict | None = None,
             want_sum: bool = False) -> CallResult:
    """Run the driver once and return its output and y (None when the call failed).

    sizes: the runtime sizes of the call (the driver reads them after the batch); fusion: the
    fusion inputs by name (skip, ada_scale, ada_shift); want_sum: read back a sum."""
    dtype = plan.layer.dtype
    with tempfile.TemporaryDirectory(prefix="gn-cuda-") as tmp:
        t = Path(tmp)
        (t / "x.bin").write_bytes(to_bits(x, dtype))
        call = str(batch) + (":" + ",".join(map(str, sizes)) if sizes else "")
        args = [str(exe), mode, call, str(t / "x.bin"), str(t / "y.bin")]
        if scale is not None:
            (t / "s.bin").write_bytes(to_bits(scale, dtype))
            (t / "o.bin").write_bytes(to_bits(offset, dtype))
            args += [str(t / "s.bin"), str(t / "o.bin")]
        for name, values in (fusion or {}).items():
            if values is not None:
                (t / f"{name}.bin").write_bytes(to_bits(values, dtype))
                args.append(f"{name}={t / f'{name}.bin'}")
        if want_sum:
            args.append(f"sum={t / 'sum.bin'}")
        full_env = {**os.environ, **(env or {})}
        proc = subprocess.run(args, capture_output=True, text=True, env=full_env,
                              timeout=timeout, check=False)
        y = None
        if proc.returncode == 0 and (t / "y.bin").is_file():
            y = from_bits((t / "y.bin").read_bytes(), dtype)
        written = None
        if want_sum and proc.returncode == 0 and (t / "sum.bin").is_file():
            written = from_bits((t / "sum.bin").read_bytes(), dtype)
    return CallResult(proc.returncode, proc.stdout, proc.stderr, y, written)


def cuda_runner(plan: Plan, exe: Path, env: dict | None = None) -> Runner:
    """Return a verify Runner that calls the layer's CUDA entry points through the driver."""

    def run(case: Case):
        params = case.scale is not None
        if case.in_place:
            mode = "inplace_params" if params else "inplace"
        else:
            mode = "params" if params else "baked"
        fusion = {k: v for k, v in case.fusion_values().items() if v is not None}
        res = run_call(exe, plan, mode, case.batch, case.x, case.scale, case.offset, env,
                       sizes=case.sizes, fusion=fusion, want_sum=case.want_sum)
        if res.y is None or (case.want_sum and res.sum is None):
            raise RuntimeError(f"{plan.prefix} CUDA driver failed ({res.returncode}): "
                               f"{res.stdout.strip()} {res.stderr.strip()[-2000:]}")
        if case.want_sum:
            return res.y, res.sum
        return res.y

    return run


def cuda_train_runners(plan: Plan, exe: Path, env: dict | None = None
                       ) -> tuple[TrainRunner, SolverRunner]:
    """Return the runners of a training layer's CUDA entry points through its training
    driver (one process a call, on files of raw elements)."""
    layer = plan.layer
    dtype = layer.dtype
    acc = np.float64 if plan.dtype.acc == "double" else np.float32

    def invoke(args: list[str], t: Path) -> None:
        proc = subprocess.run([str(exe), *args], capture_output=True, text=True,
                              env={**os.environ, **(env or {})}, timeout=600, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{plan.prefix} CUDA training driver {args[0]} failed "
                               f"({proc.returncode}): {proc.stdout.strip()} "
                               f"{proc.stderr.strip()[-2000:]}")

    def run(tc: TrainCase) -> TrainOutputs:
        case = tc.case
        with tempfile.TemporaryDirectory(prefix="gn-cuda-train-") as tmp:
            t = Path(tmp)
            inputs = {"x": case.x, "dy": tc.dy, "scale": case.scale, "offset": case.offset,
                      **{k: v for k, v in case.fusion_values().items() if v is not None}}
            for name, values in inputs.items():
                (t / f"{name}.bin").write_bytes(to_bits(values, dtype))
            call = str(case.batch) + (":" + ",".join(map(str, case.sizes)) if case.sizes else "")
            invoke(["train", tmp, call, "1" if case.in_place else "0",
                    "1" if case.want_sum else "0"], t)

            def read(name: str, stats: bool = False) -> np.ndarray:
                raw = (t / f"{name}.bin").read_bytes()
                return np.frombuffer(raw, dtype=acc).copy() if stats else from_bits(raw, dtype)

            dada = (read("dada_scale"), read("dada_shift")) if layer.adaptive else (None, None)
            return TrainOutputs(read("y"), read("mean", True), read("rstd", True), read("dx"),
                                read("dscale"), read("doffset"), *dada,
                                sum=read("sum") if case.want_sum else None)

    def solve(s: SolverInputs) -> dict:
        with tempfile.TemporaryDirectory(prefix="gn-cuda-solver-") as tmp:
            t = Path(tmp)
            arrays = {"scale": s.scale, "offset": s.offset, **s.state}
            for name, values in {**arrays, "dscale": s.dscale, "doffset": s.doffset}.items():
                (t / f"{name}.bin").write_bytes(to_bits(values, dtype))
            (t / "hyper.txt").write_text(" ".join(repr(float(v)) for v in s.hyper.values()))
            invoke([s.solver, tmp], t)
            return {name: from_bits((t / f"{name}.bin").read_bytes(), dtype) for name in arrays}

    return run, solve


def cuda_train_refusals(plan: Plan, exe: Path, case: TrainCase, env: dict | None = None
                        ) -> CaseResult:
    """Return whether the training entry points refuse NULL pointers and Adam's step 0 with
    cudaErrorInvalidValue (a CaseResult: passed or not, naming what was not refused)."""
    with tempfile.TemporaryDirectory(prefix="gn-cuda-train-") as tmp:
        t = Path(tmp)
        c = case.case
        for name, values in {"x": c.x, "dy": case.dy, "scale": c.scale, "offset": c.offset,
                             **{k: v for k, v in c.fusion_values().items()
                                if v is not None}}.items():
            (t / f"{name}.bin").write_bytes(to_bits(values, plan.layer.dtype))
        call = str(c.batch) + (":" + ",".join(map(str, c.sizes)) if c.sizes else "")
        proc = subprocess.run([str(exe), "errors", tmp, call], capture_output=True, text=True,
                              env={**os.environ, **(env or {})}, timeout=600, check=False)
    codes = dict(line.split() for line in proc.stdout.splitlines() if len(line.split()) == 2)
    want = codes.pop("invalid_value", None)
    wrong = sorted(k for k, v in codes.items() if v != want)
    passed = proc.returncode == 0 and want is not None and bool(codes) and not wrong
    return CaseResult("train: refused calls" + (f" ({', '.join(wrong)} not refused)"
                                                if wrong else ""), 0.0, 0.0, 0, passed)


# --------------------------------------------------------------------------- ptxas report


@dataclass(frozen=True)
class KernelResources:
    """One kernel's resources for one architecture, as ptxas reported them."""

    arch: int
    kernel: str
    registers: int
    shared_bytes: int
    stack_bytes: int
    spill_stores: int
    spill_loads: int

    def as_dict(self) -> dict:
        """Return the figures as plain data for the manifest."""
        return {"arch": f"sm_{self.arch}", "kernel": self.kernel, "registers": self.registers,
                "smem_bytes": self.shared_bytes, "stack_bytes": self.stack_bytes,
                "spill_stores": self.spill_stores, "spill_loads": self.spill_loads}


_ENTRY = re.compile(r"Compiling entry function '(\S+)' for 'sm_(\d+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?, (\d+) bytes smem)?")


def _readable(mangled: str) -> str:
    """Return a short readable kernel name from a mangled one: name<template arguments>."""
    # The mangled name holds a hash of nvcc's anonymous namespace that differs from one
    # compile to the next, so only the name and the template arguments are kept.
    m = re.search(r"\d([a-z_]+_kernel)I(.*)EEvP", mangled)
    if not m:
        return re.sub(r"_GLOBAL__N__[0-9a-f]+_", "_GLOBAL__N__", mangled)
    args = re.findall(r"Li(\d+)E|Lb(\d)E", m.group(2) + "E")
    flat = [a or ("true" if b == "1" else "false") for a, b in args]
    return f"{m.group(1)}<{', '.join(flat)}>"


def parse_ptxas(text: str) -> list[KernelResources]:
    """Return the per-kernel resources in nvcc -Xptxas -v output."""
    out = []
    current = None
    frame = (0, 0, 0)
    for line in text.splitlines():
        m = _ENTRY.search(line)
        if m:
            current = (_readable(m.group(1)), int(m.group(2)))
            frame = (0, 0, 0)
            continue
        m = _FRAME.search(line)
        if m and current:
            frame = tuple(int(g) for g in m.groups())
            continue
        m = _USED.search(line)
        if m and current:
            out.append(KernelResources(current[1], current[0], int(m.group(1)),
                                       int(m.group(2) or 0), *frame))
            current = None
    return out


def compile_check(plan: Plan, cp: CudaPlan, sources: list[Source]) -> list[KernelResources]:
    """Compile one layer's .cu with nvcc for its archs; return ptxas's per-kernel report."""
    if shutil.which("nvcc") is None:
        raise TargetUnavailable("CUDA target: nvcc not found on PATH")
    own = {s.name: s for s in sources if s.name in (f"{plan.prefix}.cu", f"{plan.prefix}_cuda.h")}
    cmd = ["nvcc", *NVCC_FLAGS, *gencode_flags(cp.archs), "-Xptxas", "-v", "-I.", "-c",
           f"{plan.prefix}.cu", "-o", f"{plan.prefix}.o"]
    key = content_key([__version__, "ptxas", compiler_version("nvcc"), " ".join(cmd),
                   *(f"{n}\n{s.text}" for n, s in sorted(own.items()))])
    folder = cache_root() / f"ptxas-{key}"
    report = folder / "ptxas.txt"
    if not report.is_file():
        with staged_entry(folder, report.name) as work:
            for s in own.values():
                (work / s.name).write_text(s.text)
            text = run_compiler(f"{plan.prefix}.cu (nvcc)", cmd, cwd=work)
            (work / "ptxas.txt").write_text(text)
    return parse_ptxas(report.read_text())
