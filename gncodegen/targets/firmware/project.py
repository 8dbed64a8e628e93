"""The minimal project a firmware target writes beside the layers: a program that runs each
layer on one observation and checks it, with a Makefile, a CMake toolchain file and the
board's start-up code, so `make run` (or CMake's `run` target) builds it and runs it under QEMU.

Every board of a build renders the same Makefile and program (and the folder's one
CMakeLists.txt, targets/cmake.py, builds it with a core's toolchain file); what differs per
board lives in its own files (`<board>.mk`, `<board>.cmake`, `<board>.ld`), so one folder can
hold the project for several cores.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ... import __version__
from ...dtypes import dtype as dtype_info
from ...plan import Plan
from ...reference import group_norm_reference
from ...verify import ODD_SIZE
from ...render import Source, render_template
from ..c.record import CRecord
from .boards import Board
from .harness import hex_literal
from .qemu import RUNTIME, emulator_args, render_linker_script

# The program's input: element i is a hash of i (two multiply-xorshift rounds), its top 24
# bits k giving (k - 2^23) / 2^22 in [-2, 2): exact in float and double, and the same here.
HASH_MULTIPLIERS = (0x9E3779B1, 0x85EBCA77)


@dataclass(frozen=True)
class DemoLayer:
    """One layer as the program runs it: its input's seed and the checksums to expect."""

    prefix: str
    macro: str
    ctype: str
    numel: int
    sizes: tuple[tuple[str, int], ...]   # the runtime sizes the program calls with
    sum: str                 # C literals: the float64 reference's sum of y
    sum_bound: str           # |sum - expected| the tolerance allows
    sum_sq: str              # ... and its sum of squares
    sum_sq_bound: str
    skip: bool = False       # a skip layer normalizes x + x (skip is x itself, no sum)
    adaptive: bool = False   # ... an adaptive one is modulated by zeros (its identity)


@dataclass(frozen=True)
class Project:
    """Everything the project's templates print for one board."""

    board: Board
    spec_name: str                   # the spec's file name
    processor: str                   # CMAKE_SYSTEM_PROCESSOR
    layers: tuple[DemoLayer, ...]
    support: tuple[str, ...]         # the board's start-up and I/O sources
    link_flags: tuple[str, ...]      # for the Makefile (run in the project's folder)
    cmake_link_flags: tuple[str, ...]   # the same, the linker script found from the toolchain
    run: tuple[str, ...]             # the emulator's command line, the program's path last
    hash_multipliers: tuple[int, int] = HASH_MULTIPLIERS


def demo_input(numel: int) -> np.ndarray:
    """Return the program's input for a layer of numel elements (float64, exact in float)."""
    h = np.arange(numel, dtype=np.uint32)
    for multiplier in HASH_MULTIPLIERS:
        h = (h ^ (h >> np.uint32(16))) * np.uint32(multiplier)
    k = (h >> np.uint32(8)).astype(np.int64)
    return (k - (1 << 23)) / float(1 << 22)


def demo_layer(rec: CRecord) -> DemoLayer:
    """Return the program's view of a layer: its checksums from the float64 reference, and
    bounds that any output within the verification tolerance meets."""
    plan = rec.plan
    # Runtime sizes at an odd size within their bounds: one of the sizes verification ran.
    sizes = tuple((r.name, min(ODD_SIZE, r.max or ODD_SIZE)) for r in plan.runtime_sizes)
    layer = plan.layer.at_sizes(tuple(v for _, v in sizes)) if sizes else plan.layer
    x = demo_input(layer.observation_numel)
    zeros = np.zeros(layer.num_channels)
    y = group_norm_reference(x, layer, 1, skip=x, ada_scale=zeros, ada_shift=zeros)
    tol = dtype_info(plan.layer.dtype).tolerance
    n = y.size
    peak = float(np.max(np.abs(y))) if n else 0.0
    err = tol * peak                 # the most any element may be off
    sum_bound = n * err
    sum_sq_bound = n * err * (2.0 * peak + err)
    lit = lambda v: hex_literal(float(v), "double")   # noqa: E731 (exact double literals)
    return DemoLayer(plan.prefix, plan.macro, rec.ctype, n, sizes, lit(np.sum(y)),
                     lit(sum_bound), lit(np.sum(y * y)), lit(sum_sq_bound),
                     skip=layer.skip, adaptive=layer.adaptive)


def run_command(board: Board) -> tuple[str, ...]:
    """Return how the project's program runs under QEMU (as the verification runs it, output
    to the terminal), its path to be appended."""
    return (board.runner, *emulator_args(board))


def project_for(board: Board, records: tuple[CRecord, ...], spec_name: str) -> Project:
    """Return the project record of a build's layers on one board."""
    script = f"{board.name}.ld"
    link = tuple(script if f == "image.ld" else f for f in board.link_flags)
    cmake_link = tuple("${CMAKE_CURRENT_LIST_DIR}/" + f if f == script else f for f in link)
    support = tuple(n for n in board.support if n.endswith(".c"))
    processor = ("arm" if board.cc.startswith("arm-") else
                 "riscv32" if "riscv" in board.name else "aarch64")
    return Project(board, spec_name, processor, tuple(demo_layer(r) for r in records),
                   support, link, cmake_link, run_command(board))


def render_project(project: Project) -> list[Source]:
    """Return the project's files: the program, the build files and the board's support."""
    board = project.board
    ctx = dict(project=project, board=board, generator=f"gncodegen {__version__}")
    files = [Source("fw_demo.c", render_template("firmware/project/fw_demo.c.j2", **ctx)),
             Source("Makefile", render_template("firmware/project/Makefile.j2", **ctx)),
             Source(f"{board.name}.mk", render_template("firmware/project/board.mk.j2", **ctx)),
             Source(f"{board.name}.cmake", render_template("firmware/project/toolchain.cmake.j2",
                                                           **ctx))]
    if board.linker_template:
        script = render_linker_script(board)
        files.append(Source(f"{board.name}.ld", script.text))
    files += [Source(n, (RUNTIME / n).read_text()) for n in board.support]
    return files
