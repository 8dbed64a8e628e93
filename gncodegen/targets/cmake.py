"""The output folder's CMakeLists.txt: one file whatever targets wrote the folder.

It finds at configure time which layers' C and CUDA sources are there, so a C, a CUDA and a
firmware build of the same spec write the same bytes, and a folder that holds several
targets' files builds each of them: the C layers as a static and a shared library, the CUDA
layers as a shared library where a CUDA compiler is found, both installed with a package
config for find_package; with a core's toolchain file, the firmware demo.
"""

from __future__ import annotations

from .. import __version__
from ..plan import Plan
from ..render import Source, render_template


def cmake_project_name(spec_stem: str) -> str:
    """Return the CMake project and library name for a spec (its stem as an identifier)."""
    name = "".join(ch if ch.isalnum() or ch == "_" else "_" for ch in spec_stem)
    return name if name and not name[0].isdigit() else f"gn_{name}"


def render_cmake(plans: tuple[Plan, ...], spec_name: str, spec_stem: str) -> Source:
    """Return the folder's CMakeLists.txt for a spec's layers."""
    from .cuda.options import CUDA_ARCH

    archs = sorted({a for p in plans for a in CUDA_ARCH.value(p.layer)})
    text = render_template("common/CMakeLists.txt.j2", project=cmake_project_name(spec_stem),
                           spec_name=spec_name, layers=[p.prefix for p in plans],
                           c_layers=[p.prefix for p in plans
                                     if p.layer.dtype in ("single", "double")],
                           archs=archs, version=__version__.split("+")[0],
                           generator=f"gncodegen {__version__}")
    return Source("CMakeLists.txt", text)
