"""The CUDA target's own options: the architectures in the spec, the runner on the command line."""

from __future__ import annotations

import re
from typing import Any

from ...errors import SpecError
from ...options import SpecOption
from ...text import preview
from ..base import CliOption

# Compute capabilities nvcc 13 builds for.
CUDA_ARCHS = (50, 52, 53, 60, 61, 62, 70, 72, 75, 80, 86, 87, 89, 90, 100, 103, 110, 120, 121)


def parse_cuda_arch(value: Any, fld: str) -> tuple[int, ...]:
    """Return the compute capabilities a spec lists (80, or "sm_80"), sorted, each once."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value:
        raise SpecError(fld, f"must be a list of compute capabilities like [80, 90], got "
                             f"{preview(value)}")
    out = []
    for i, v in enumerate(value):
        if isinstance(v, str) and re.fullmatch(r"sm_[0-9]+", v):
            v = int(v[3:])
        if isinstance(v, bool) or not isinstance(v, int) or v not in CUDA_ARCHS:
            raise SpecError(f"{fld}[{i}]", f"{preview(v)} is not a known compute capability "
                                           f"({', '.join(map(str, CUDA_ARCHS))})")
        if v not in out:
            out.append(v)
    return tuple(sorted(out))


CUDA_ARCH = SpecOption("cuda_arch", ("CudaArch",), (80, 90), parse_cuda_arch,
                       "the compute capabilities nvcc builds for")

# How the verification runs: on a GPU when one is found (auto), only on a GPU (gpu: an error
# without one), or under the host emulation even where a GPU exists.
CUDA_RUNNER = CliOption(
    "cuda_runner", ("auto", "gpu", "emulation"), "auto",
    "Where the CUDA target's verification runs: a GPU when one is found (auto), a GPU or an "
    "error (gpu), or the host emulation even where a GPU exists (emulation).")
