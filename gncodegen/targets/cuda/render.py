"""Rendering of the CUDA target: `<name>.cu`, `<name>_cuda.h` and the output's CMakeLists.txt."""

from __future__ import annotations

from ...plan import Plan
from ...render import Source, render_template
from .lower import CudaOptions, CudaPlan, CudaRuntimePlan, lower_cuda
from .options import CUDA_ARCH


def offset_terms(cp: CudaPlan) -> list[tuple[str, str]]:
    """Return (expression, labels) per term of element_offset(i, batch), slowest loop first."""
    out = []
    wide = cp.offset_type != "int"
    for t in cp.offset_terms:
        idx = "i" if t.div == 1 else f"(i / {t.div})"
        if t.mod is not None:
            idx = f"({idx} % {t.mod})"
        if t.per_batch:
            expr = f"(size_t){idx} * {t.stride}u * batch"
        elif t.stride == 1:
            expr = f"(size_t){idx}" if wide else idx
        else:
            expr = f"(size_t){idx} * {t.stride}u" if wide else f"{idx} * {t.stride}"
        out.append((expr, t.labels))
    return out


def render_cuda(plan: Plan, spec_name: str, options: CudaOptions | None = None,
                cuda_plan: CudaPlan | CudaRuntimePlan | None = None) -> tuple[Source, Source]:
    """Return the CUDA header and source for one layer."""
    cp = cuda_plan or lower_cuda(plan, options)
    ctx = dict(plan=plan, cp=cp, spec_name=spec_name, offset_terms=offset_terms)
    source = "cuda/runtime.cu.j2" if isinstance(cp, CudaRuntimePlan) else "cuda/source.cu.j2"
    return (Source(f"{plan.prefix}_cuda.h", render_template("cuda/header.h.j2", **ctx)),
            Source(f"{plan.prefix}.cu", render_template(source, **ctx)))


def cmake_project_name(spec_stem: str) -> str:
    """Return the CMake project and library name for a spec (its stem as an identifier)."""
    name = "".join(ch if ch.isalnum() or ch == "_" else "_" for ch in spec_stem)
    return name if name and not name[0].isdigit() else f"gn_{name}"


def render_cmake(plans: tuple[Plan, ...], spec_name: str, spec_stem: str) -> Source:
    """Return a CMakeLists.txt that builds one shared library from the C and CUDA sources."""
    archs = sorted({a for p in plans for a in CUDA_ARCH.value(p.layer)})
    c_sources = [f"{p.prefix}.c" for p in plans if p.layer.dtype in ("single", "double")]
    cuda_sources = [f"{p.prefix}.cu" for p in plans]
    text = render_template("cuda/CMakeLists.txt.j2", plans=plans, spec_name=spec_name,
                           project=cmake_project_name(spec_stem), archs=archs,
                           c_sources=c_sources, cuda_sources=cuda_sources,
                           generator=plans[0].generator)
    return Source("CMakeLists.txt", text)
