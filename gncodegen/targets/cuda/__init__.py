"""The CUDA target: render the sources, then verify them on a GPU when one is present, else under
the host emulation, saying which. `--cuda-runner` overrides the choice: `gpu` insists on a GPU,
`emulation` stays on the host where a GPU exists (the manifest then records the same figures on
every machine)."""

from __future__ import annotations

import shutil
from dataclasses import replace

from ...errors import SpecError, TargetUnavailable
from ...plan import Plan
from ...render import Source
from ...spec import Spec
from ...verify import CaseResult, verify_layer
from ..base import Outcome, RunOptions, Target
from ..c import spec_file_name
from .lower import GROUP_LIMIT, CudaPlan, lower_cuda
from .options import CUDA_ARCH, CUDA_RUNNER
from ..cmake import render_cmake
from ...progress import say
from .render import render_cuda
from .runner import (build_harness, compile_check, cuda_runner, cuda_train_refusals,
                     cuda_train_runners, gpu_name, train_harness_source)
from ...verify_train import train_cases, verify_training



def chosen_gpu(cuda_runner_value: str) -> str | None:
    """Return the GPU the verification runs on, or None for the host emulation.

    Raises TargetUnavailable when `gpu` was asked for and this machine has none.
    """
    if cuda_runner_value == "emulation":
        return None
    gpu = gpu_name()
    if cuda_runner_value == "gpu" and gpu is None:
        missing = "nvcc" if shutil.which("nvcc") is None else "an NVIDIA GPU (nvidia-smi lists none)"
        raise TargetUnavailable(f"--cuda-runner: gpu needs {missing} on this machine; "
                                "use auto or emulation to verify under the host emulation")
    return gpu


class CudaTarget(Target):
    """CUDA for the spec's architectures, compiled by nvcc, run on a GPU or its emulation."""

    name = "cuda"
    description = "CUDA (nvcc; verified on a GPU or under host emulation)"
    dtypes = ("single", "double", "half", "bfloat16")
    cli_options = (CUDA_RUNNER,)
    spec_options = (CUDA_ARCH,)

    def check(self, spec: Spec) -> None:
        super().check(spec)
        for layer in spec.layers:
            if layer.runtime_sizes:
                continue                 # indexed in size_t, from the call's sizes
            group = layer.observation_numel // layer.num_groups
            if group > GROUP_LIMIT:
                raise SpecError(f"{layer.field_prefix}input_size",
                                f"a group of {group} elements is more than the cuda target "
                                f"indexes within a group ({GROUP_LIMIT}, 2^31 - 2^26): use "
                                "more groups, or the c target")

    def lower(self, plan: Plan) -> CudaPlan:
        return lower_cuda(plan)

    def render(self, spec: Spec, records: tuple[CudaPlan, ...]) -> list[Source]:
        """Return every layer's `<name>_cuda.h` and `<name>.cu`, and the folder's CMakeLists.txt."""
        name = spec_file_name(spec)
        out = [src for cp in records for src in render_cuda(cp.plan, name, cuda_plan=cp)]
        out.append(render_cmake(tuple(cp.plan for cp in records), name, spec.stem))
        return out

    def verify(self, spec: Spec, records: tuple[CudaPlan, ...], sources: list[Source],
               options: RunOptions) -> Outcome:
        """Compile-check with nvcc (zero spills), then run every layer against the reference."""
        asked = options.get(CUDA_RUNNER)
        gpu = chosen_gpu(asked)
        mode = "gpu" if gpu else "emulation"
        runner = f"gpu ({gpu})" if gpu else "host emulation"
        notes = []
        kernels: dict[str, list[dict]] = {}
        have_nvcc = shutil.which("nvcc") is not None
        reports = []
        for cp in records:
            plan = cp.plan
            checks = []
            if have_nvcc:
                say(f"cuda: {plan.prefix}: nvcc for {', '.join(f'sm_{a}' for a in cp.archs)}")
                resources = compile_check(plan, cp, sources)
                kernels[plan.prefix] = [r.as_dict() for r in resources]
                for arch in cp.archs:
                    spills = sum(r.spill_stores + r.spill_loads + r.stack_bytes
                                 for r in resources if r.arch == arch)
                    checks.append(CaseResult(f"nvcc sm_{arch}: no spills or stack",
                                             float(spills), 0.0, 0, spills == 0))
            say(f"cuda: {plan.prefix}: {'on the GPU' if gpu else 'under the host emulation'}")
            exe = build_harness(plan, cp, sources, mode, keep=options.keep)
            report = verify_layer(plan.layer, "cuda", runner, cuda_runner(plan, exe))
            if plan.layer.training:
                train_exe = build_harness(plan, cp, sources, mode, keep=options.keep,
                                          harness=train_harness_source(plan, cp))
                run, solve = cuda_train_runners(plan, train_exe)
                cases = list(train_cases(plan.layer))
                checks += [*verify_training(plan.layer, run, solve, cases),
                           cuda_train_refusals(plan, train_exe, cases[0])]
            reports.append(replace(report, cases=report.cases + tuple(checks)))
        if gpu:
            notes.append(f"cuda: built with nvcc and ran on the GPU ({gpu})")
        elif asked == "emulation" and gpu_name():
            notes.append("cuda: ran the exact generated .cu under the host emulation as asked "
                         f"(--cuda-runner emulation), not on the GPU here ({gpu_name()})")
        else:
            notes.append("cuda: no GPU here; ran the exact generated .cu under the host "
                         "emulation (g++, one host thread per CUDA thread)")
        if not have_nvcc:
            notes.append("cuda: nvcc not found, so the compile check (registers, spills) was "
                         "skipped")
        manifest = {"runner": runner, "kernels": kernels} if kernels else {"runner": runner}
        return Outcome(tuple(reports), manifest, tuple(notes))


TARGET = CudaTarget()
