"""Rendering of the CUDA target: `<name>.cu` and `<name>_cuda.h` (the folder's CMakeLists.txt is
targets/cmake.py's)."""

from __future__ import annotations

from ...plan import Plan
from ...render import Source, render_template
from .lower import CudaOptions, CudaPlan, CudaRuntimePlan, lower_cuda


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
