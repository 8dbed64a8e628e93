"""The CUDA target as the pipeline sees it: render the sources, then verify them on a GPU
when one is present, else under the host emulation, saying which. `--cuda-runner` overrides
the choice: `gpu` insists on a GPU, `emulation` stays on the host where a GPU exists (the
manifest then records the same figures on every machine)."""

from __future__ import annotations

import shutil
from dataclasses import replace

from .cuda_plan import lower_cuda
from .cuda_render import render_cmake, render_cuda
from .cuda_run import build_harness, compile_check, cuda_runner, gpu_name
from .errors import TargetUnavailable
from .plan import Plan
from .render import Source
from .spec import Spec
from .verify import CaseResult, verify_layer


def _spec_file(spec: Spec) -> str:
    return spec.path.replace("\\", "/").rsplit("/", 1)[-1]


def render_cuda_sources(spec: Spec, plans: tuple[Plan, ...]) -> list[Source]:
    """Return every layer's `<name>_cuda.h` and `<name>.cu`, and the folder's CMakeLists.txt."""
    name = _spec_file(spec)
    out = [src for plan in plans for src in render_cuda(plan, name)]
    out.append(render_cmake(plans, name, spec.stem))
    return out


def chosen_gpu(cuda_runner: str) -> str | None:
    """Return the GPU the verification runs on, or None for the host emulation.

    Raises TargetUnavailable when `gpu` was asked for and this machine has none.
    """
    if cuda_runner == "emulation":
        return None
    gpu = gpu_name()
    if cuda_runner == "gpu" and gpu is None:
        missing = "nvcc" if shutil.which("nvcc") is None else "an NVIDIA GPU (nvidia-smi lists none)"
        raise TargetUnavailable(f"--cuda-runner: gpu needs {missing} on this machine; "
                                "use auto or emulation to verify under the host emulation")
    return gpu


def verify_cuda(spec: Spec, plans: tuple[Plan, ...], sources: list[Source], options):
    """Compile-check with nvcc (zero spills), then run every layer against the reference."""
    from .targets import Outcome

    gpu = chosen_gpu(options.cuda_runner)
    mode = "gpu" if gpu else "emulation"
    runner = f"gpu ({gpu})" if gpu else "host emulation"
    notes = []
    kernels: dict[str, list[dict]] = {}
    have_nvcc = shutil.which("nvcc") is not None
    reports = []
    for plan in plans:
        cp = lower_cuda(plan)
        checks = []
        if have_nvcc:
            resources = compile_check(plan, cp, sources)
            kernels[plan.prefix] = [r.as_dict() for r in resources]
            for arch in cp.archs:
                spills = sum(r.spill_stores + r.spill_loads + r.stack_bytes
                             for r in resources if r.arch == arch)
                checks.append(CaseResult(f"nvcc sm_{arch}: no spills or stack", float(spills),
                                         0.0, 0, spills == 0))
        exe = build_harness(plan, cp, sources, mode, keep=options.keep)
        report = verify_layer(plan.layer, "cuda", runner, cuda_runner(plan, exe))
        reports.append(replace(report, cases=report.cases + tuple(checks)))
    if gpu:
        notes.append(f"cuda: built with nvcc and ran on the GPU ({gpu})")
    elif options.cuda_runner == "emulation" and gpu_name():
        notes.append("cuda: ran the exact generated .cu under the host emulation as asked "
                     f"(--cuda-runner emulation), not on the GPU here ({gpu_name()})")
    else:
        notes.append("cuda: no GPU here; ran the exact generated .cu under the host emulation "
                     "(g++, one host thread per CUDA thread)")
    if not have_nvcc:
        notes.append("cuda: nvcc not found, so the compile check (registers, spills) was skipped")
    manifest = {"runner": runner, "kernels": kernels} if kernels else {"runner": runner}
    return Outcome(tuple(reports), manifest, tuple(notes))
