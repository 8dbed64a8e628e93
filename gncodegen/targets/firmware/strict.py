"""Strict compiles: the generated C compiles without a warning under every compiler and core.

A success is remembered in the build cache, so a rerun compiles only what changed.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from ...build import STRICT_WARNINGS, cache_root, compiler_version, content_key, run_compiler, write_sources
from ...render import Source
from .boards import M4_FLAGS, M7_FLAGS, M55_FLAGS, require_tool


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
    # s390x evaluates float arithmetic in double (FLT_EVAL_METHOD 1) under -std=c99: a float
    # compared with a float literal is promoted, which -Wdouble-promotion reports.
    StrictConfig("s390x", "s390x-linux-gnu-gcc", ()),
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
        key = content_key(["strict", version, *command, *(f"{s.name}\n{s.text}" for s in
                                                  (*headers, src))])
        stamp = cache_root() / "strict" / key
        if stamp.is_file():
            continue
        with tempfile.TemporaryDirectory(prefix="gncodegen-strict-") as tmp:
            write_sources(Path(tmp), [*headers, src])
            run_compiler(f"{src.name} ({config.label} {opt})", command, cwd=Path(tmp))
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.write_text(" ".join(command) + "\n")
