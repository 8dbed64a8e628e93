"""The firmware boards: each core's compiler, flags and the QEMU machine its test image runs on.

A board is data: the cross compiler, the CPU flags, the optimization of the verification build,
the emulator and its machine, the memory map the linker script is rendered from. Memory maps are
those of QEMU's boards (hw/arm/mps2.c, hw/arm/mps2-tz.c).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass

from ...errors import TargetUnavailable

KiB = 1024
MiB = 1024 * KiB

@dataclass(frozen=True)
class Region:
    """A span of a board's memory map."""

    origin: int
    length: int


@dataclass(frozen=True)
class Board:
    """One firmware core and the QEMU machine its test image runs on: a complete record, so a
    new board is one more entry in BOARDS."""

    name: str
    description: str
    cc: str                          # compiler driver
    cpu_flags: tuple[str, ...]       # selects the core, the instruction set and the float ABI
    opt: str                         # optimization of the verification build
    runner: str                      # "qemu-system-arm", "qemu-aarch64" or "" (compile only)
    machine: str = ""                # QEMU machine for bare-metal images
    flash: Region | None = None      # where code and constants go (bare metal)
    ram: Region | None = None        # where .data, .bss and the stack go (bare metal)
    stack_size: int = 16 * KiB
    vectors: Region | None = None    # where the vector table goes when not at FLASH's start
    tools_prefix: str = ""           # binutils prefix (arm-none-eabi-)
    # What the test image links besides the generated code and the harness: start-up and I/O
    # files from runtime/, and the linker script's template ("" for a hosted program).
    support: tuple[str, ...] = ("fw_io.h", "hosted_io.c")
    linker_template: str = ""
    code_room: int = 128 * KiB       # flash kept for code beside the test vectors
    link_flags: tuple[str, ...] = ()  # what the image's link adds to the CPU flags
    qemu_flags: tuple[str, ...] = ()  # what the emulator's command line adds (firmware, ...)
    # The frequency of the counter fw_count reads, in counts per second of QEMU's virtual
    # clock (a Cortex-M's SysTick runs on the board's core clock); 0: the image does not count.
    count_hz: int = 0

    @property
    def bare_metal(self) -> bool:
        """True for an image that runs on an emulated machine (no operating system)."""
        return self.machine != ""

    @property
    def measures_stack(self) -> bool:
        """True where the image's own linker script lays out the stack, so the harness can
        paint it and report how deep each call went."""
        return self.linker_template != ""

    @property
    def verified_opts(self) -> tuple[str, ...]:
        """The optimization levels a layer is verified at: the board's own and the other side
        of __OPTIMIZE_SIZE__ (the -Os build compiles the compact nest, any other the fast
        kernels), so whichever a user's flags select has run on this core."""
        return (self.opt, "-O2" if self.opt == "-Os" else "-Os")

    @property
    def counts_instructions(self) -> bool:
        """True where the test image runs under QEMU -icount and counts each call's
        instructions."""
        return self.count_hz != 0

    def instructions(self, count: int) -> int:
        """Return the instructions a count of the board's counter stands for: under -icount
        each instruction advances the virtual clock by 2^ICOUNT_SHIFT ns."""
        return round(count * 1_000_000_000 / (self.count_hz << ICOUNT_SHIFT))

    @property
    def soft_float(self) -> bool:
        """True for a core without an FPU: float arithmetic calls the run-time ABI's helpers."""
        return "-mfloat-abi=soft" in self.cpu_flags

    @property
    def runner_name(self) -> str:
        """How the verification ran, for reports."""
        if not self.runner:
            return "compile only"
        return f"qemu {self.machine}" if self.machine else self.runner


# RV32IMAFC with single-precision floats in registers; picolibc's headers and libraries.
RV32_FLAGS = ("-march=rv32imafc", "-mabi=ilp32f", "--specs=picolibc.specs")
M0_FLAGS = ("-mcpu=cortex-m0", "-mthumb", "-mfloat-abi=soft")
M3_FLAGS = ("-mcpu=cortex-m3", "-mthumb", "-mfloat-abi=soft")
M4_FLAGS = ("-mcpu=cortex-m4", "-mthumb", "-mfpu=fpv4-sp-d16", "-mfloat-abi=hard")
M7_FLAGS = ("-mcpu=cortex-m7", "-mthumb", "-mfpu=fpv5-d16", "-mfloat-abi=hard")
M33_FLAGS = ("-mcpu=cortex-m33", "-mthumb", "-mfpu=fpv5-sp-d16", "-mfloat-abi=hard")
M55_FLAGS = ("-mcpu=cortex-m55", "-mthumb", "-mfloat-abi=hard")
# A Cortex-M image: the vector table and reset code, and output through semihosting.
CORTEX_M_SUPPORT = ("fw_io.h", "startup_cortex_m.c", "semihosting.c", "fw_count_systick.c")
# Under -icount shift=6 each instruction is 64 ns of virtual time: at least one tick of the
# slowest SysTick clock below (16 MHz, 62.5 ns), so a count resolves single instructions.
ICOUNT_SHIFT = 6
# SysTick clocks of QEMU's boards (hw/arm/mps2.c, mps2-tz.c, nrf51_soc.c).
NRF51_HZ = 16_000_000
MPS2_HZ = 25_000_000
AN505_HZ = 20_000_000
AN547_HZ = 32_000_000
CORTEX_M_LINKER = "firmware/link.ld.j2"
CORTEX_M_LINK = ("-nostartfiles", "--specs=nano.specs", "-T", "image.ld", "-Wl,--gc-sections")

# Memory maps of QEMU's boards (hw/arm/mps2.c, hw/arm/mps2-tz.c). The M-profile core fetches
# its initial stack pointer and reset vector from address 0.
BOARDS: dict[str, Board] = {
    t.name: t for t in (
        # micro:bit (nRF51822): a Cortex-M0 (Armv6-M, no FPU, as on M0/M0+ parts) with
        # 256 KiB of flash at 0 and 16 KiB of RAM at 0x20000000: small layers only.
        Board("cortex-m0", "Cortex-M0, soft float (qemu microbit)", "arm-none-eabi-gcc",
                       M0_FLAGS, "-Os", "qemu-system-arm", "microbit",
                       Region(0x00000000, 256 * KiB), Region(0x20000000, 16 * KiB),
                       stack_size=4 * KiB, tools_prefix="arm-none-eabi-",
                       support=CORTEX_M_SUPPORT, linker_template=CORTEX_M_LINKER,
                       link_flags=CORTEX_M_LINK,
                       count_hz=NRF51_HZ,
                       code_room=64 * KiB),
        # AN385: a Cortex-M3 without an FPU (float in software, as on many products), the
        # same SSRAM layout as AN386. -Os: what such firmware ships with.
        Board("cortex-m3", "Cortex-M3, soft float (qemu mps2-an385)", "arm-none-eabi-gcc",
                       M3_FLAGS, "-Os", "qemu-system-arm", "mps2-an385",
                       Region(0x00000000, 4 * MiB), Region(0x20000000, 4 * MiB),
                       tools_prefix="arm-none-eabi-", support=CORTEX_M_SUPPORT,
                       linker_template=CORTEX_M_LINKER, link_flags=CORTEX_M_LINK,
                       count_hz=MPS2_HZ),
        # AN386: 4 MiB SSRAM1 at 0 stands in for flash, 4 MiB SSRAM2/3 at 0x20000000 for RAM.
        # -Os: what a Cortex-M4 firmware ships with.
        Board("cortex-m4", "Cortex-M4F (qemu mps2-an386)", "arm-none-eabi-gcc",
                       M4_FLAGS, "-Os", "qemu-system-arm", "mps2-an386",
                       Region(0x00000000, 4 * MiB), Region(0x20000000, 4 * MiB),
                       tools_prefix="arm-none-eabi-", support=CORTEX_M_SUPPORT,
                       linker_template=CORTEX_M_LINKER, link_flags=CORTEX_M_LINK,
                       count_hz=MPS2_HZ),
        # AN500: the same SSRAM layout as AN386 with a Cortex-M7 and its double-precision FPU.
        Board("cortex-m7", "Cortex-M7 (qemu mps2-an500)", "arm-none-eabi-gcc",
                       M7_FLAGS, "-O2", "qemu-system-arm", "mps2-an500",
                       Region(0x00000000, 4 * MiB), Region(0x20000000, 4 * MiB),
                       tools_prefix="arm-none-eabi-", support=CORTEX_M_SUPPORT,
                       linker_template=CORTEX_M_LINKER, link_flags=CORTEX_M_LINK,
                       count_hz=MPS2_HZ),
        # AN505: a Cortex-M33 (Armv8-M Mainline, single-precision FPU) that boots in the
        # secure state from SVTOR 0x10000000: code and constants in the secure alias of the
        # 4 MiB SSRAM1, data and stack in that of the 2 MiB SSRAM2 (0x28000000 + 0x10000000).
        # -O2: the fast kernels on a microcontroller core.
        Board("cortex-m33", "Cortex-M33 (qemu mps2-an505)", "arm-none-eabi-gcc",
                       M33_FLAGS, "-O2", "qemu-system-arm", "mps2-an505",
                       Region(0x10000000, 4 * MiB), Region(0x38000000, 2 * MiB),
                       tools_prefix="arm-none-eabi-", support=CORTEX_M_SUPPORT,
                       linker_template=CORTEX_M_LINKER, link_flags=CORTEX_M_LINK,
                       count_hz=AN505_HZ),
        # AN547: the vector table in the ITCM at 0, code and constants in the 2 MiB SRAM at
        # 0x01000000, data and stack in the 512 KiB DTCM at 0x20000000.
        # -O3: lets gcc vectorize with MVE (Helium), the path this core exists for.
        Board("cortex-m55", "Cortex-M55 with MVE (qemu mps3-an547)",
                       "arm-none-eabi-gcc", M55_FLAGS, "-O3", "qemu-system-arm", "mps3-an547",
                       Region(0x01000000, 2 * MiB), Region(0x20000000, 512 * KiB),
                       tools_prefix="arm-none-eabi-", vectors=Region(0x00000000, 1 * KiB),
                       support=CORTEX_M_SUPPORT, linker_template=CORTEX_M_LINKER,
                       link_flags=CORTEX_M_LINK,
                       count_hz=AN547_HZ),
        # A 32-bit RISC-V microcontroller core (RV32IMAFC) on QEMU's virt machine: picolibc's
        # start-up and linker script (code at 0x80000000, data and stack 4 MiB above), output
        # through RISC-V semihosting. -Os, as such firmware ships.
        Board("riscv32", "RISC-V RV32IMAFC (qemu virt, picolibc)", "riscv64-unknown-elf-gcc",
                       RV32_FLAGS, "-Os", "qemu-system-riscv32", "virt",
                       Region(0x80000000, 4 * MiB), Region(0x80400000, 4 * MiB),
                       tools_prefix="riscv64-unknown-elf-",
                       link_flags=("--oslib=semihost", "--crt0=semihost",
                                   "-Wl,--defsym=__flash=0x80000000",
                                   "-Wl,--defsym=__flash_size=0x400000",
                                   "-Wl,--defsym=__ram=0x80400000",
                                   "-Wl,--defsym=__ram_size=0x400000",
                                   "-Wl,--defsym=__stack_size=0x4000"),
                       qemu_flags=("-bios", "none"),
                       support=("fw_io.h", "hosted_io.c", "fw_count_riscv.c"),
                       count_hz=1_000_000_000),    # minstret: one count per virtual ns
        # A Linux program run by qemu-aarch64 in user mode; -O3 vectorizes with NEON.
        Board("aarch64-linux", "AArch64 Linux (qemu-aarch64 user mode)",
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
    "riscv64-unknown-elf-gcc": "gcc-riscv64-unknown-elf picolibc-riscv64-unknown-elf",
    "qemu-system-riscv32": "qemu-system-misc",
    "aarch64-linux-gnu-gcc": "gcc-aarch64-linux-gnu libc6-dev-arm64-cross",
    "s390x-linux-gnu-gcc": "gcc-s390x-linux-gnu libc6-dev-s390x-cross",
    "arm-none-eabi-objdump": "binutils-arm-none-eabi",
    "clang": "clang",
    "gcc": "gcc",
    "g++": "g++",
    "make": "make",
    "cmake": "cmake",
}
# The footprint is measured where the budgets are set: Cortex-M4F at -Os.
FOOTPRINT_TARGET = "cortex-m4"
FOOTPRINT_OPT = "-Os"
# Budgets for single precision: kernel text and worst stack at -Os on a Cortex-M4.
TEXT_BUDGET = 400
STACK_BUDGET = 96
QEMU_TIMEOUT_S = 60


def require_tool(tool: str) -> str:
    """Return the path of a tool, or raise TargetUnavailable naming the package that brings it."""
    path = shutil.which(tool)
    if path is None:
        package = PACKAGES.get(tool, tool)
        raise TargetUnavailable(f"'{tool}' not found on PATH: install the Debian package(s) "
                                f"{package} (scripts/install-toolchains.sh does)")
    return path
