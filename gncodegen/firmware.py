"""Firmware targets: the generated C built for Cortex-M and AArch64 Linux and proven under QEMU.

A target here is data (`FirmwareTarget`): the cross compiler, the CPU flags, the QEMU board and
its memory map. Verifying a layer on one builds a test image from the generated `<name>.c/.h`, a
harness whose seeded inputs are the verification cases (verify.make_cases), start-up code and a
linker script rendered for the board; QEMU runs it with semihosting, the harness prints every
output's bit pattern, and verify.verify_layer compares them with the float64 reference.

Besides running, this module checks what firmware engineers ask of the code: it compiles without
a warning under the strict flags on every compiler (STRICT_CONFIGS), makes no double-precision
or heap calls, holds no mutable state and does not recurse; and it measures the footprint
(sections and worst stack depth) on a Cortex-M at -Os.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from . import __version__
from .build import STRICT_WARNINGS, cache_root, compiler_version, run_compiler, staged_entry
from .errors import GncodegenError, TargetUnavailable, VerificationError
from .plan import Plan
from .render import Source, render_template, template_dir
from .spec import Layer, Spec
from .verify import Case, Report, make_cases, verify_layer

KiB = 1024
MiB = 1024 * KiB

# --------------------------------------------------------------------------- targets as data


@dataclass(frozen=True)
class Region:
    """A span of a board's memory map."""

    origin: int
    length: int


@dataclass(frozen=True)
class FirmwareTarget:
    """One firmware target: how to compile for it and where its test image runs."""

    name: str
    description: str
    cc: str                          # compiler driver
    cpu_flags: tuple[str, ...]       # selects the core, the instruction set and the float ABI
    opt: str                         # optimization of the verification build
    runner: str                      # "qemu-system-arm", "qemu-aarch64" or "" (compile only)
    board: str = ""                  # QEMU machine for bare-metal images
    flash: Region | None = None      # where code and constants go (bare metal)
    ram: Region | None = None        # where .data, .bss and the stack go (bare metal)
    stack_size: int = 16 * KiB
    vectors: Region | None = None    # where the vector table goes when not at FLASH's start
    tools_prefix: str = ""           # binutils prefix (arm-none-eabi-)

    @property
    def bare_metal(self) -> bool:
        """True for a Cortex-M image that boots from a vector table."""
        return self.board != ""

    @property
    def runner_name(self) -> str:
        """How the verification ran, for reports."""
        if not self.runner:
            return "compile only"
        return f"qemu {self.board}" if self.board else self.runner


M4_FLAGS = ("-mcpu=cortex-m4", "-mthumb", "-mfpu=fpv4-sp-d16", "-mfloat-abi=hard")
M7_FLAGS = ("-mcpu=cortex-m7", "-mthumb", "-mfpu=fpv5-d16", "-mfloat-abi=hard")
M55_FLAGS = ("-mcpu=cortex-m55", "-mthumb", "-mfloat-abi=hard")

# Memory maps of QEMU's boards (hw/arm/mps2.c, hw/arm/mps2-tz.c). The M-profile core fetches
# its initial stack pointer and reset vector from address 0.
FIRMWARE_TARGETS: dict[str, FirmwareTarget] = {
    t.name: t for t in (
        # AN386: 4 MiB SSRAM1 at 0 stands in for flash, 4 MiB SSRAM2/3 at 0x20000000 for RAM.
        # -Os: what a Cortex-M4 firmware ships with.
        FirmwareTarget("cortex-m4", "Cortex-M4F (qemu mps2-an386)", "arm-none-eabi-gcc",
                       M4_FLAGS, "-Os", "qemu-system-arm", "mps2-an386",
                       Region(0x00000000, 4 * MiB), Region(0x20000000, 4 * MiB),
                       tools_prefix="arm-none-eabi-"),
        # AN500: the same SSRAM layout as AN386 with a Cortex-M7 and its double-precision FPU.
        FirmwareTarget("cortex-m7", "Cortex-M7 (qemu mps2-an500)", "arm-none-eabi-gcc",
                       M7_FLAGS, "-O2", "qemu-system-arm", "mps2-an500",
                       Region(0x00000000, 4 * MiB), Region(0x20000000, 4 * MiB),
                       tools_prefix="arm-none-eabi-"),
        # AN547: the vector table in the ITCM at 0, code and constants in the 2 MiB SRAM at
        # 0x01000000, data and stack in the 512 KiB DTCM at 0x20000000.
        # -O3: lets gcc vectorize with MVE (Helium), the path this core exists for.
        FirmwareTarget("cortex-m55", "Cortex-M55 with MVE (qemu mps3-an547)",
                       "arm-none-eabi-gcc", M55_FLAGS, "-O3", "qemu-system-arm", "mps3-an547",
                       Region(0x01000000, 2 * MiB), Region(0x20000000, 512 * KiB),
                       tools_prefix="arm-none-eabi-", vectors=Region(0x00000000, 1 * KiB)),
        # A Linux program run by qemu-aarch64 in user mode; -O3 vectorizes with NEON.
        FirmwareTarget("aarch64-linux", "AArch64 Linux (qemu-aarch64 user mode)",
                       "aarch64-linux-gnu-gcc", (), "-O3", "qemu-aarch64",
                       tools_prefix="aarch64-linux-gnu-"),
    )
}
AARCH64_SYSROOT = "/usr/aarch64-linux-gnu"
# Debian packages that bring each tool (scripts/install-toolchains.sh installs them).
PACKAGES = {
    "arm-none-eabi-gcc": "gcc-arm-none-eabi libnewlib-arm-none-eabi",
    "arm-none-eabi-size": "binutils-arm-none-eabi",
    "arm-none-eabi-nm": "binutils-arm-none-eabi",
    "qemu-system-arm": "qemu-system-arm",
    "qemu-aarch64": "qemu-user",
    "aarch64-linux-gnu-gcc": "gcc-aarch64-linux-gnu libc6-dev-arm64-cross",
    "arm-none-eabi-objdump": "binutils-arm-none-eabi",
    "clang": "clang",
    "gcc": "gcc",
    "g++": "g++",
    "make": "make",
}
# The footprint is measured where the issue sets its budget: Cortex-M4F at -Os.
FOOTPRINT_TARGET = "cortex-m4"
FOOTPRINT_OPT = "-Os"
# Budgets for single precision (issue 5).
TEXT_BUDGET = 400
STACK_BUDGET = 96
QEMU_TIMEOUT_S = 60
HEX_PER_LINE = 8


def require_tool(tool: str) -> str:
    """Return the path of a tool, or raise TargetUnavailable naming the package that brings it."""
    path = shutil.which(tool)
    if path is None:
        package = PACKAGES.get(tool, tool)
        raise TargetUnavailable(f"'{tool}' not found on PATH: install the Debian package(s) "
                                f"{package} (scripts/install-toolchains.sh does)")
    return path


# --------------------------------------------------------------------------- strict compiles


@dataclass(frozen=True)
class StrictConfig:
    """One compiler and flag set the generated C must compile under without a warning."""

    label: str
    cc: str
    flags: tuple[str, ...]
    language: str = "c"


STRICT_C_FLAGS = ("-std=c99", *STRICT_WARNINGS)
STRICT_OPTS = ("-O0", "-Os", "-O3")
STRICT_CONFIGS: tuple[StrictConfig, ...] = (
    StrictConfig("gcc", "gcc", ()),
    StrictConfig("clang", "clang", ()),
    # x86-64 with AVX-512 (x86-64-v4): the fast kernels' intrinsics paths compile too.
    StrictConfig("gcc-avx512", "gcc", ("-march=x86-64-v4",)),
    StrictConfig("clang-avx512", "clang", ("-march=x86-64-v4",)),
    StrictConfig("cortex-m4", "arm-none-eabi-gcc", M4_FLAGS),
    StrictConfig("cortex-m7", "arm-none-eabi-gcc", M7_FLAGS),
    StrictConfig("cortex-m55", "arm-none-eabi-gcc", M55_FLAGS),
    StrictConfig("aarch64", "aarch64-linux-gnu-gcc", ()),
    # The header is included from C++ firmware too; the source compiles as C++ as well.
    StrictConfig("g++", "g++", (), language="c++"),
    StrictConfig("g++-avx512", "g++", ("-march=x86-64-v4",), language="c++"),
)


def strict_command(config: StrictConfig, opt: str, source: str, obj: str) -> list[str]:
    """Return the compile command of one source under a strict configuration."""
    if config.language == "c++":
        return [config.cc, "-x", "c++", "-std=c++11", "-Wall", "-Wextra", "-Werror", opt,
                *config.flags, "-c", source, "-o", obj]
    return [config.cc, *STRICT_C_FLAGS, opt, *config.flags, "-c", source, "-o", obj]


def check_strict(sources: list[Source], config: StrictConfig, opt: str) -> None:
    """Compile every generated .c under one strict configuration; raise BuildError on a warning.

    A success is remembered in the build cache (keyed by the sources, the command and the
    compiler's version), so a rerun compiles only what changed.
    """
    require_tool(config.cc)
    version = compiler_version(config.cc)
    headers = [s for s in sources if s.name.endswith(".h")]
    for src in (s for s in sources if s.name.endswith(".c")):
        command = strict_command(config, opt, src.name, src.name[:-2] + ".o")
        key = _key(["strict", version, *command, *(f"{s.name}\n{s.text}" for s in
                                                  (*headers, src))])
        stamp = cache_root() / "strict" / key
        if stamp.is_file():
            continue
        with tempfile.TemporaryDirectory(prefix="gncodegen-strict-") as tmp:
            _write(Path(tmp), [*headers, src])
            run_compiler(f"{src.name} ({config.label} {opt})", command, cwd=Path(tmp))
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.write_text(" ".join(command) + "\n")


# --------------------------------------------------------------------------- object checks


@dataclass(frozen=True)
class Footprint:
    """What one layer's kernel costs on a core: section bytes, stack depth and outside calls."""

    layer: str
    cpu: str
    opt: str
    text: int          # code, with its literal pools
    rodata: int        # constants other than the learned parameters
    data: int
    bss: int
    params: int        # <name>_scale and <name>_offset, in flash
    stack: int         # deepest path from an entry point, in bytes
    calls: tuple[str, ...]   # functions called outside the layer's object
    stack_measured: int | None = None  # deepest stack the verification image's calls used

    def as_dict(self) -> dict:
        """Return the figures as plain data for the manifest."""
        return {"cpu": self.cpu, "opt": self.opt, "text": self.text, "rodata": self.rodata,
                "data": self.data, "bss": self.bss, "params": self.params,
                "stack": self.stack, "calls": list(self.calls),
                **({} if self.stack_measured is None else
                   {"stack_measured": self.stack_measured})}

    def over_budget(self, dtype: str) -> list[str]:
        """Return the single-precision budgets this footprint breaks, in words."""
        problems = []
        if self.data or self.bss:
            problems.append(f"{self.data + self.bss} bytes of RAM (.data/.bss); the kernel "
                            "must keep none")
        if dtype == "single":
            if self.text > TEXT_BUDGET:
                problems.append(f"text {self.text} B > {TEXT_BUDGET} B")
            if self.stack > STACK_BUDGET:
                problems.append(f"stack {self.stack} B > {STACK_BUDGET} B")
            elif (self.stack_measured or 0) > STACK_BUDGET:
                problems.append(f"stack {self.stack_measured} B measured under QEMU (with "
                                f"{', '.join(self.calls) or 'no outside calls'}) > "
                                f"{STACK_BUDGET} B")
        return problems


# What a layer's object may call: the square root of its precision, and the memory functions a
# compiler may emit even for freestanding code. Double precision on a core without a
# double-precision FPU also calls the run-time library's soft-float helpers.
ALLOWED_CALLS = {"single": frozenset({"sqrtf"}), "double": frozenset({"sqrt"})}
COMPILER_CALLS = frozenset({"memcpy", "memset", "memmove"})
SOFT_DOUBLE_HELPER = re.compile(r"__aeabi_(d\w+|\w*2d)\Z")   # __aeabi_dmul, __aeabi_f2d, ...


def measure_footprint(plan: Plan, source: Source, header: Source,
                      target: FirmwareTarget | None = None, opt: str = FOOTPRINT_OPT
                      ) -> Footprint:
    """Return the footprint of one layer's compiled source (Cortex-M4F at -Os by default).

    Sections come from `size -A` of an object built with -ffunction-sections -fdata-sections,
    so the parameters' .rodata.<name>_scale/_offset are told apart; the stack depth is the
    deepest path through the -fcallgraph-info call graph, each function's -fstack-usage frame
    added (outside callees such as sqrtf count 0 and are listed in `calls`; the verification
    image measures the real depth, callees included, as stack_measured).
    """
    target = target or FIRMWARE_TARGETS[FOOTPRINT_TARGET]
    size_tool = require_tool(target.tools_prefix + "size")
    nm_tool = require_tool(target.tools_prefix + "nm")
    require_tool(target.cc)
    obj = source.name[:-2] + ".o"
    command = [target.cc, *STRICT_C_FLAGS, opt, *target.cpu_flags, "-ffunction-sections",
               "-fdata-sections", "-fstack-usage", "-fcallgraph-info=su", "-c", source.name,
               "-o", obj]
    key = _key(["footprint", compiler_version(target.cc), *command, header.text, source.text])
    cached = cache_root() / "footprint" / f"{key}.json"
    if cached.is_file():
        record = json.loads(cached.read_text())
        return Footprint(**{**record, "calls": tuple(record["calls"])})
    with tempfile.TemporaryDirectory(prefix="gncodegen-footprint-") as tmp:
        work = Path(tmp)
        _write(work, [header, source])
        run_compiler(f"{source.name} (footprint, {target.name} {opt})", command, cwd=work)
        sections = _sections(run_compiler("size", [size_tool, "-A", obj], cwd=work))
        undefined = _undefined(run_compiler("nm", [nm_tool, "-u", obj], cwd=work))
        frames = _stack_usage((work / (obj[:-2] + ".su")).read_text())
        edges = _call_edges((work / (obj[:-2] + ".ci")).read_text())
    params_names = {f".rodata.{plan.prefix}_scale", f".rodata.{plan.prefix}_offset"}
    text = sum(v for k, v in sections.items() if k == ".text" or k.startswith(".text."))
    params = sum(v for k, v in sections.items() if k in params_names)
    rodata = sum(v for k, v in sections.items()
                 if (k == ".rodata" or k.startswith(".rodata.")) and k not in params_names)
    data = sum(v for k, v in sections.items() if k == ".data" or k.startswith(".data."))
    bss = sum(v for k, v in sections.items() if k == ".bss" or k.startswith(".bss.")
              or k == "COMMON")
    entries = [f"{plan.prefix}_predict", f"{plan.prefix}_predict_with_params"]
    stack = max(_deepest(e, frames, edges, ()) for e in entries)
    fp = Footprint(plan.prefix, target.name, opt, text, rodata, data, bss, params, stack,
                   tuple(sorted(undefined)))
    cached.parent.mkdir(parents=True, exist_ok=True)
    partial = cached.with_name(f".{cached.name}.{os.getpid()}")
    partial.write_text(json.dumps({"layer": fp.layer, **fp.as_dict()}))
    os.replace(partial, cached)      # atomic: a parallel reader never sees half a record
    return fp


def check_object_calls(fp: Footprint, dtype: str) -> list[str]:
    """Return the outside calls a layer must not make (empty when all are allowed).

    Single precision may call sqrtf and nothing else: no double arithmetic helpers
    (__aeabi_d*), no sqrt, no heap, no I/O.
    """
    allowed = ALLOWED_CALLS[dtype] | COMPILER_CALLS
    return [sym for sym in fp.calls
            if sym not in allowed
            and not (dtype == "double" and SOFT_DOUBLE_HELPER.match(sym))]


def _sections(size_output: str) -> dict[str, int]:
    """Return section name -> bytes from `size -A` output."""
    out: dict[str, int] = {}
    for line in size_output.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1].isdigit() and parts[0].startswith("."):
            out[parts[0]] = out.get(parts[0], 0) + int(parts[1])
    return out


def _undefined(nm_output: str) -> set[str]:
    return {line.split()[-1] for line in nm_output.splitlines() if line.strip()}


def _stack_usage(su_text: str) -> dict[str, int]:
    """Return function -> frame bytes from a -fstack-usage file; a dynamic frame is an error."""
    frames = {}
    for line in su_text.splitlines():
        where, size, kind = line.rsplit("\t", 2)
        func = where.rsplit(":", 1)[-1]
        if "dynamic" in kind and "bounded" not in kind:
            raise GncodegenError(f"{func}: stack frame is dynamic ({kind}); the generated "
                                 "code must use fixed frames (no VLAs or alloca)")
        frames[func] = int(size)
    return frames


_EDGE = re.compile(r'edge: \{ sourcename: "([^"]+)" targetname: "([^"]+)"')


def _call_edges(ci_text: str) -> dict[str, tuple[str, ...]]:
    """Return caller -> callees from a -fcallgraph-info file."""
    edges: dict[str, list[str]] = {}
    for caller, callee in _EDGE.findall(ci_text):
        edges.setdefault(caller, []).append(callee)
    return {k: tuple(v) for k, v in edges.items()}


def _deepest(func: str, frames: dict[str, int], edges: dict[str, tuple[str, ...]],
             path: tuple[str, ...]) -> int:
    """Return the deepest stack from func down; raise on recursion (a cycle in the graph)."""
    if func in path:
        cycle = " -> ".join((*path[path.index(func):], func))
        raise GncodegenError(f"recursion in the generated code: {cycle}")
    own = frames.get(func, 0)
    callees = edges.get(func, ())
    return own + max((_deepest(c, frames, edges, (*path, func)) for c in callees), default=0)


def footprint_table(footprints: list[Footprint]) -> list[str]:
    """Return the footprint table the CLI prints, one line per layer."""
    rows = [["layer", "cpu", "opt", "text", "rodata", "data", "bss", "params", "stack",
             "ran", "calls"]]
    for fp in footprints:
        ran = "-" if fp.stack_measured is None else str(fp.stack_measured)
        rows.append([fp.layer, fp.cpu, fp.opt, str(fp.text), str(fp.rodata), str(fp.data),
                     str(fp.bss), str(fp.params), str(fp.stack), ran,
                     ", ".join(fp.calls) or "-"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) if 3 <= i <= 9 else c.ljust(w)
                       for i, (c, w) in enumerate(zip(r, widths))).rstrip() for r in rows]
    return ["footprint (bytes; params: the static const scale/offset, in flash; stack: deepest "
            "call path from -fstack-usage; ran: deepest stack measured under QEMU):", *lines]


# --------------------------------------------------------------------------- the test image


@dataclass(frozen=True)
class HarnessCase:
    """One case as the harness holds it: its inputs as exact C literals."""

    name: str
    batch: int
    in_place: bool
    numel: int
    x_literals: tuple[str, ...]
    scale_literals: tuple[str, ...] = ()
    offset_literals: tuple[str, ...] = ()


@dataclass(frozen=True)
class Harness:
    """Everything harness.c.j2 prints."""

    target: str
    cases: tuple[HarnessCase, ...]
    max_numel: int
    measure_stack: bool          # paint the stack and report each call's depth (bare metal)
    per_line: int = HEX_PER_LINE


def hex_literal(value: float, dtype: str) -> str:
    """Return a C99 hexadecimal literal that is exactly value (already rounded to dtype).

    NaN and infinities have no literal: they are <math.h>'s NAN and INFINITY (float constant
    expressions, converted explicitly for double).
    """
    value = float(value)
    if not np.isfinite(value):
        name = "NAN" if np.isnan(value) else ("-INFINITY" if value < 0 else "INFINITY")
        return f"(double){name}" if dtype == "double" else name
    text = value.hex()
    mant, exp = text.split("p")
    if "." in mant:
        mant = mant.rstrip("0").rstrip(".")
    return f"{mant}p{exp}" + ("" if dtype == "double" else "f")


def harness_for(plan: Plan, target: FirmwareTarget, cases: list[Case]) -> Harness:
    """Return the Harness holding a layer's cases for a target."""
    dt = plan.layer.dtype
    hcases = []
    for case in cases:
        assert '"' not in case.name and "\\" not in case.name, case.name
        lits = tuple(hex_literal(v, dt) for v in case.x)
        params = ((), ())
        if case.scale is not None:
            params = (tuple(hex_literal(v, dt) for v in case.scale),
                      tuple(hex_literal(v, dt) for v in case.offset))
        hcases.append(HarnessCase(case.name, case.batch, case.in_place, len(case.x), lits,
                                  *params))
    return Harness(target.name, tuple(hcases), max(c.numel for c in hcases),
                   measure_stack=target.bare_metal)


def render_harness(plan: Plan, harness: Harness) -> Source:
    """Return the harness source for one layer."""
    return Source(f"{plan.prefix}_harness.c",
                  render_template("firmware/harness.c.j2", plan=plan, harness=harness,
                                  generator=f"gncodegen {__version__}"))


def render_linker_script(target: FirmwareTarget) -> Source:
    """Return the linker script of a bare-metal target's board."""
    return Source("image.ld", render_template("firmware/link.ld.j2", target=target,
                                              generator=f"gncodegen {__version__}"))


def support_sources(target: FirmwareTarget) -> list[Source]:
    """Return the start-up and I/O sources a target's image links besides the harness."""
    names = (["fw_io.h", "startup_cortex_m.c", "semihosting.c"] if target.bare_metal
             else ["fw_io.h", "hosted_io.c"])
    folder = template_dir() / "firmware"
    return [Source(n, (folder / n).read_text()) for n in names]


def case_bytes(cases: list[Case], dtype: str) -> tuple[int, int]:
    """Return (bytes of constants, bytes of the work buffer) a set of cases needs."""
    size = 8 if dtype == "double" else 4
    const = sum(len(c.x) * size + (0 if c.scale is None else 2 * len(c.scale) * size)
                for c in cases)
    return const, max(len(c.x) for c in cases) * size


def firmware_cases(layer: Layer, target: FirmwareTarget, seed: int = 0) -> list[Case]:
    """Return the verification cases for a layer, sized to fit the target's board.

    Batch > 1 where the format has a B dimension (2 observations; 1 when two do not fit).
    """
    for max_batch in (2, 1):
        cases = make_cases(layer, seed=seed, max_batch=max_batch)
        if not target.bare_metal:
            return cases
        const, work = case_bytes(cases, layer.dtype)
        code_room = 128 * KiB
        if (const + code_room <= target.flash.length
                and work + target.stack_size <= target.ram.length):
            return cases
    raise TargetUnavailable(
        f"{target.name}: the test vectors of layer '{layer.name}' need {const // KiB} KiB of "
        f"constants and {work // KiB} KiB of RAM, more than the {target.board} image holds "
        f"({target.flash.length // KiB} KiB / {target.ram.length // KiB} KiB)")


@dataclass(frozen=True)
class Image:
    """A built test program: where it is and what runs it."""

    path: Path
    target: FirmwareTarget


def image_flags(target: FirmwareTarget) -> tuple[str, ...]:
    """Return the compile flags of a target's verification build (strict, as shipped)."""
    return (*STRICT_C_FLAGS, target.opt, *target.cpu_flags, "-ffunction-sections",
            "-fdata-sections")


def build_image(target: FirmwareTarget, plan: Plan, layer_sources: list[Source],
                harness: Source, keep: bool = False) -> Image:
    """Return the test program of one layer for a target, compiling it unless cached.

    The generated code and the harness compile under the strict flags; the start-up and
    semihosting code under the same warnings in GNU C (they need inline assembly).
    """
    require_tool(target.cc)
    version = compiler_version(target.cc)
    support = support_sources(target)
    extra = [render_linker_script(target)] if target.bare_metal else []
    flags = image_flags(target)
    support_flags = ("-std=gnu99", *[f for f in flags if f not in ("-std=c99", "-Wpedantic")])
    if target.bare_metal:
        link = [target.cc, *target.cpu_flags, "-nostartfiles", "--specs=nano.specs",
                "-T", "image.ld", "-Wl,--gc-sections"]
    else:
        link = [target.cc, *target.cpu_flags]
    everything = [*layer_sources, harness, *support, *extra]
    key = _key(["image", __version__, target.name, version, " ".join(flags), " ".join(link),
                *(f"{s.name}\n{s.text}" for s in everything)])
    folder = cache_root() / "firmware" / key
    program = folder / ("image.elf" if target.bare_metal else "program")
    if not program.is_file():
        with staged_entry(folder, program.name) as work:
            _write(work, everything)
            objects = []
            for src in everything:
                if not src.name.endswith(".c"):
                    continue
                obj = src.name[:-2] + ".o"
                own = flags if src in layer_sources or src is harness else support_flags
                run_compiler(f"{src.name} ({target.name})",
                             [target.cc, *own, "-c", src.name, "-o", obj], cwd=work)
                objects.append(obj)
            run_compiler(f"link ({target.name})",
                         [*link, *objects, "-lm", "-o", program.name], cwd=work)
    if keep:
        print(f"build folder ({target.name}, {plan.prefix}): {folder}", file=sys.stderr)
    return Image(program, target)


def run_command(image: Image, output: Path) -> list[str]:
    """Return the command line that runs a built image under QEMU, its printout to output.

    Semihosting writes go to a file chardev, so QEMU's own messages (stderr) stay apart.
    """
    target = image.target
    if target.bare_metal:
        return [require_tool("qemu-system-arm"), "-machine", target.board, "-nographic",
                "-monitor", "none", "-chardev", f"file,id=harness,path={output}",
                "-semihosting-config", "enable=on,target=native,chardev=harness",
                "-kernel", str(image.path)]
    return [require_tool("qemu-aarch64"), "-L", AARCH64_SYSROOT, str(image.path)]


def run_image(image: Image, timeout: float = QEMU_TIMEOUT_S) -> str:
    """Return what a test image printed; raise VerificationError when it fails or hangs."""
    name = image.target.name
    with tempfile.TemporaryDirectory(prefix="gncodegen-run-") as tmp:
        output = Path(tmp) / "harness.txt"
        command = run_command(image, output)
        try:
            proc = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True,
                                  text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise VerificationError(f"{name}: {Path(command[0]).name} did not finish in "
                                    f"{timeout:g} s (a fault loops forever): "
                                    f"{' '.join(command)}") from None
        printed = output.read_text() if image.target.bare_metal and output.exists() \
            else proc.stdout
    if proc.returncode != 0 or not printed.endswith("\nend\n"):
        tail = [ln for ln in (printed + proc.stderr).splitlines() if ln.strip()][-3:]
        raise VerificationError(f"{name}: test image failed (exit {proc.returncode}) under "
                                f"{' '.join(command)}: {' | '.join(tail) or 'no output'}")
    return printed


_CASE = re.compile(r"case (\d+) (.*) rc (-?\d+) numel (\d+)(?: stack (\d+))?\Z")


def measured_stack(text: str) -> int | None:
    """Return the deepest stack a harness measured over its cases (None if it measured none)."""
    depths = [int(m.group(5)) for line in text.splitlines()
              if (m := _CASE.match(line)) and m.group(5) is not None]
    return max(depths, default=None)


def parse_output(text: str, plan: Plan, cases: list[Case]) -> dict[str, np.ndarray]:
    """Return case name -> outputs (float64) from a harness's printout; raise on anything odd."""
    dtype = np.dtype("<u8" if plan.scalar.bytes == 8 else "<u4")
    float_type = np.float64 if plan.scalar.bytes == 8 else np.float32
    digits = 2 * plan.scalar.bytes
    hex_line = re.compile(rf"[0-9a-f]{{{digits}}}( [0-9a-f]{{{digits}}})*")
    lines = text.splitlines()
    try:
        start = lines.index(f"harness {plan.prefix} {len(cases)}")
    except ValueError:
        raise VerificationError(f"{plan.prefix}: the harness printed no header") from None
    i = start + 1
    outputs: dict[str, np.ndarray] = {}
    for index, case in enumerate(cases):
        m = _CASE.match(lines[i]) if i < len(lines) else None
        if not m or int(m.group(1)) != index or m.group(2) != case.name:
            raise VerificationError(f"{plan.prefix}: expected case {index} ({case.name}), "
                                    f"got {lines[i] if i < len(lines) else 'end of output'!r}")
        rc, numel = int(m.group(3)), int(m.group(4))
        if rc != 0:
            raise VerificationError(f"{plan.prefix}: case '{case.name}' returned {rc}")
        rows = 0
        while (rows < math.ceil(numel / HEX_PER_LINE) and i + 1 + rows < len(lines)
               and hex_line.fullmatch(lines[i + 1 + rows])):
            rows += 1
        words = " ".join(lines[i + 1:i + 1 + rows]).split()
        if len(words) != numel:
            raise VerificationError(f"{plan.prefix}: case '{case.name}' printed {len(words)} "
                                    f"values, expected {numel}")
        bits = np.array([int(w, 16) for w in words], dtype=dtype)
        outputs[case.name] = bits.view(float_type).astype(np.float64)
        i += 1 + rows
    if i >= len(lines) or lines[i] != "api ok":
        raise VerificationError(f"{plan.prefix}: the API checks failed on the target: "
                                f"{lines[i] if i < len(lines) else 'no output'}")
    return outputs


# --------------------------------------------------------------------------- verification


@dataclass(frozen=True)
class LayerRun:
    """What verifying one layer on one firmware target produced."""

    report: Report
    footprint: Footprint | None
    image: Path | None
    measured_stack: int | None = None   # deepest stack a kernel call used in the image


def verify_layer_on(target: FirmwareTarget, plan: Plan, layer_sources: list[Source],
                    keep: bool = False, cases: list[Case] | None = None,
                    corrupt=None) -> LayerRun:
    """Return the verification of one layer on a firmware target.

    corrupt, when given, edits the parsed outputs before the comparison (tests use it to see
    a wrong value fail).
    """
    layer = plan.layer
    for config in STRICT_CONFIGS:
        if config.label == target.name or (target.name == "aarch64-linux"
                                           and config.label == "aarch64"):
            check_strict(layer_sources, config, target.opt)
    cases = cases if cases is not None else firmware_cases(layer, target)
    if not target.runner:
        raise TargetUnavailable(f"{target.name}: no emulator to run on")
    image = build_image(target, plan, layer_sources,
                        render_harness(plan, harness_for(plan, target, cases)), keep)
    printout = run_image(image)
    outputs = parse_output(printout, plan, cases)
    if corrupt is not None:
        outputs = corrupt(outputs)
    report = verify_layer(layer, target.name, target.runner_name,
                          lambda case: outputs[case.name], cases)
    footprint = None
    if target.bare_metal:
        header, source = _layer_pair(plan, layer_sources)
        footprint = measure_footprint(plan, source, header, target)
        if target.opt == footprint.opt:
            # The image ran the very code measured: add what its calls really used.
            footprint = replace(footprint, stack_measured=measured_stack(printout))
        bad = check_object_calls(footprint, layer.dtype)
        if bad:
            raise VerificationError(
                f"{plan.prefix}: the {target.name} object calls {', '.join(bad)}; "
                f"{layer.dtype} precision may call only "
                f"{', '.join(sorted(ALLOWED_CALLS[layer.dtype]))}")
    return LayerRun(report, footprint, image.path, measured_stack(printout))


def _layer_pair(plan: Plan, sources: list[Source]) -> tuple[Source, Source]:
    by_name = {s.name: s for s in sources}
    return by_name[f"{plan.prefix}.h"], by_name[f"{plan.prefix}.c"]


def verifier(name: str):
    """Return the verify hook of targets.Target for the firmware target `name`."""
    def verify(spec: Spec, plans: tuple[Plan, ...], sources: list[Source], options):
        return verify_target(name, spec, plans, sources, options.keep)
    return verify


def verify_target(name: str, spec: Spec, plans: tuple[Plan, ...], sources: list[Source],
                  keep: bool):
    """Return the targets.Outcome of verifying every layer on the firmware target `name`."""
    from .targets import Outcome

    target = FIRMWARE_TARGETS[name]
    reports, footprints, manifest = [], [], {}
    for plan in plans:
        layer_sources = list(_layer_pair(plan, sources))
        run = verify_layer_on(target, plan, layer_sources, keep=keep)
        reports.append(run.report)
        # Each Cortex-M reports its own footprint at -Os; a Linux build reports the
        # Cortex-M4's, the core the budgets are set for.
        fp = run.footprint or measure_footprint(plan, layer_sources[1], layer_sources[0])
        footprints.append(fp)
        manifest[plan.prefix] = fp.as_dict()
    notes = footprint_table(footprints)
    for fp, plan in zip(footprints, plans):
        for problem in fp.over_budget(plan.layer.dtype):
            notes.append(f"warning: {fp.layer} on {fp.cpu} {fp.opt}: {problem}")
    return Outcome(tuple(reports), {"footprint": manifest}, tuple(notes))


# --------------------------------------------------------------------------- helpers


def _key(parts) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(str(part).encode())
        h.update(b"\0")
    return h.hexdigest()[:24]


def _write(folder: Path, sources) -> None:
    for src in sources:
        (folder / src.name).write_text(src.text)
