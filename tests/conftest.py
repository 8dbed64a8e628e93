"""Shared helpers: specs from dicts, built C modules, the torch oracle."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from gncodegen.targets.c.runner import build_c_module
from gncodegen.plan import lower
from gncodegen.targets.c import render_c
from gncodegen.pipeline import parse_spec
from gncodegen.spec import Layer

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"


def small_cuda_geometry():
    """CUDA geometry small enough that small shapes reach every strategy under emulation:
    64-thread blocks, 16 bytes per thread on chip, clusters of up to 4 blocks, split even when
    small (warp, block, cluster, looped, rows and split kernels)."""
    from gncodegen.targets.cuda.lower import CudaOptions
    return CudaOptions(block_threads=(64,), warp_team_block=64, onchip_bytes=16, max_cluster=4,
                       wide_min_numel=0)


def make_layer(base_dir: Path | None = None, allow_code: bool = False, **keys) -> Layer:
    """Return the one Layer of a spec given as keyword arguments."""
    keys.setdefault("name", "t")
    spec = parse_spec(yaml.safe_dump(keys), base_dir or Path("."), "t", allow_code=allow_code)
    return spec.layers[0]


def build_layers(*layers: Layer, flags=None):
    """Return (plans, module) for layers compiled together through the build cache."""
    plans = tuple(lower(layer) for layer in layers)
    sources = [s for p in plans for s in render_c(p, "test.yaml")]
    kwargs = {} if flags is None else {"flags": flags}
    return plans, build_c_module(plans, sources, **kwargs)


def torch_group_norm(x: np.ndarray, layer: Layer, batch: int, scale, offset) -> np.ndarray:
    """Return torch.nn.functional.group_norm of a flat buffer in the layer's layout (float64 out)."""
    import torch

    from gncodegen.reference import canonical, from_canonical, to_flat, to_logical

    canon = canonical(to_logical(x, layer, batch), layer)          # (N, C, R) float64 values
    dtype = torch.float64 if layer.dtype == "double" else torch.float32
    t = torch.from_numpy(np.ascontiguousarray(canon)).to(dtype)
    y = torch.nn.functional.group_norm(
        t, layer.num_groups, torch.tensor(np.asarray(scale)).to(dtype),
        torch.tensor(np.asarray(offset)).to(dtype), layer.epsilon)
    out = y.to(torch.float64).numpy()
    return to_flat(from_canonical(out, layer, batch), layer)


def cpu_has_avx512f() -> bool:
    """Whether this CPU runs AVX-512F code (the CI machines do; a build for it dies elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return "avx512f" in flags.split()


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def slow_cc(root: Path) -> tuple[dict[str, str], Path]:
    """Return an environment whose `cc` waits 30 s (after making a mark) before compiling."""
    bin_dir = root / "bin"
    bin_dir.mkdir()
    mark = root / "compiling"
    real_cc = subprocess.run(["sh", "-c", "command -v cc"], capture_output=True,
                             text=True).stdout.strip()
    (bin_dir / "cc").write_text(
        "#!/bin/sh\n"
        f'case "$*" in *--version*) exec {real_cc} "$@";; esac\n'
        f"touch {mark}\nsleep 30\nexec {real_cc} \"$@\"\n")
    (bin_dir / "cc").chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}, mark
