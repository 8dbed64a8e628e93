"""The test image: built with the board's cross compiler, run under QEMU with semihosting."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ... import __version__
from ...build import compiler_version, content_key, cache_root, run_compiler, staged_entry, write_sources
from ...errors import VerificationError
from ...plan import Plan
from ...render import Source, render_template
from .boards import AARCH64_SYSROOT, ICOUNT_SHIFT, QEMU_TIMEOUT_S, Board, require_tool
from .strict import STRICT_C_FLAGS

RUNTIME = Path(__file__).resolve().parent / "runtime"


def render_linker_script(board: Board) -> Source:
    """Return the linker script of a bare-metal target's board."""
    return Source("image.ld", render_template(board.linker_template, board=board,
                                              generator=f"gncodegen {__version__}"))


def support_sources(board: Board) -> list[Source]:
    """Return the start-up and I/O sources a target's image links besides the harness."""
    return [Source(n, (RUNTIME / n).read_text()) for n in board.support]


@dataclass(frozen=True)
class Image:
    """A built test program: where it is and what runs it."""

    path: Path
    board: Board
    compiler: str = ""               # the compiler, as its --version names it
    layer_flags: tuple[str, ...] = ()   # what the generated code was compiled with


def image_flags(board: Board, opt: str | None = None) -> tuple[str, ...]:
    """Return the compile flags of a target's verification build (strict, as shipped) at opt
    (the board's own level unless given)."""
    return (*STRICT_C_FLAGS, opt or board.opt, *board.cpu_flags, "-ffunction-sections",
            "-fdata-sections")


def build_image(board: Board, plan: Plan, layer_sources: list[Source],
                harness: Source, keep: bool = False, opt: str | None = None,
                cflags: tuple[str, ...] | None = None) -> Image:
    """Return the test program of one layer for a target, compiling it unless cached.

    The generated code and the harness compile under the strict flags at opt; the start-up and
    semihosting code under the same warnings in GNU C (they need inline assembly). cflags,
    when given, are a user's own flags: the generated code compiles with exactly those (after
    the core's CPU flags, which the emulated core needs).
    """
    require_tool(board.cc)
    version = compiler_version(board.cc)
    support = support_sources(board)
    extra = [render_linker_script(board)] if board.linker_template else []
    flags = image_flags(board, opt)
    layer_flags = flags if cflags is None else (*board.cpu_flags, *cflags)
    support_flags = ("-std=gnu99", *[f for f in flags if f not in ("-std=c99", "-Wpedantic")])
    link = [board.cc, *board.cpu_flags, *board.link_flags]
    everything = [*layer_sources, harness, *support, *extra]
    key = content_key(["image", __version__, board.name, version, " ".join(flags),
                " ".join(layer_flags), " ".join(link),
                *(f"{s.name}\n{s.text}" for s in everything)])
    folder = cache_root() / "firmware" / key
    program = folder / ("image.elf" if board.bare_metal else "program")
    if not program.is_file():
        with staged_entry(folder, program.name) as work:
            write_sources(work, everything)
            objects = []
            for src in everything:
                if not src.name.endswith(".c"):
                    continue
                obj = src.name[:-2] + ".o"
                own = (layer_flags if src in layer_sources else
                       flags if src is harness else support_flags)
                run_compiler(f"{src.name} ({board.name})",
                             [board.cc, *own, "-c", src.name, "-o", obj], cwd=work)
                objects.append(obj)
            run_compiler(f"link ({board.name})",
                         [*link, *objects, "-lm", "-o", program.name], cwd=work)
    if keep:
        print(f"build folder ({board.name}, {plan.prefix}): {folder}", file=sys.stderr)
    return Image(program, board, version, layer_flags)


def run_command(image: Image, output: Path) -> list[str]:
    """Return the command line that runs a built image under QEMU, its printout to output.

    Semihosting writes go to a file chardev, so QEMU's own messages (stderr) stay apart; a
    board that counts instructions runs with -icount, its virtual clock tied to them.
    """
    board = image.board
    if board.bare_metal:
        icount = ("-icount", f"shift={ICOUNT_SHIFT}") if board.counts_instructions else ()
        return [require_tool(board.runner), *emulator_args(board, icount, (
            "-chardev", f"file,id=harness,path={output}",
            "-semihosting-config", "enable=on,target=native,chardev=harness")),
            str(image.path)]
    return [require_tool(board.runner), *emulator_args(board), str(image.path)]


def emulator_args(board: Board, before: tuple[str, ...] = (),
                  semihosting: tuple[str, ...] = ("-semihosting-config",
                                                  "enable=on,target=native")) -> tuple[str, ...]:
    """Return the emulator's arguments for a board, the program's path to follow: the machine
    without a display or monitor, `before` and the board's own flags, semihosting (to stdout
    unless told otherwise) and -kernel on bare metal; the C library's root on Linux."""
    if board.bare_metal:
        return ("-machine", board.machine, "-nographic", "-monitor", "none", *before,
                *board.qemu_flags, *semihosting, "-kernel")
    return ("-L", AARCH64_SYSROOT)


def run_image(image: Image, timeout: float = QEMU_TIMEOUT_S, verdict: bool = False) -> str:
    """Return what a test image printed; raise VerificationError when it fails or hangs.

    verdict: the harness reports its own failures (its printout names each), so a complete
    printout (through "end") that exited with status 1 is returned for the caller to read.
    """
    name = image.board.name
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
        printed = output.read_text() if image.board.bare_metal and output.exists() \
            else proc.stdout
    complete = printed.endswith("\nend\n")
    if not complete or proc.returncode not in ((0, 1) if verdict else (0,)):
        tail = [ln for ln in (printed + proc.stderr).splitlines() if ln.strip()][-3:]
        raise VerificationError(f"{name}: test image failed (exit {proc.returncode}) under "
                                f"{' '.join(command)}: {' | '.join(tail) or 'no output'}")
    return printed
