"""Building the generated C into a Python module with cffi (API mode), and calling it.

The generated sources are compiled by us with the strict flags (so a warning is an error and
the failure carries the exact command and the compiler's output); only cffi's own wrapper is
compiled with ordinary flags. The cache key is every source's text, the flags, the compiler's
version and the Python ABI, so a cached module is reused only when nothing that shaped it changed.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import cffi
import numpy as np

from ... import __version__
from ...build import (STRICT_WARNINGS, cache_root, compiler_version, content_key, run_compiler,
                      staged_entry, write_sources)
from ...render import Source
from ...verify import Case, Runner
from ...verify_train import SolverInputs, SolverRunner, TrainCase, TrainOutputs, TrainRunner
from ...plan import Plan
from .record import CRecord, as_record

# Verification builds are portable x86-64/aarch64 code at -O2: the figures they give are the
# same on every machine with the same compiler, so manifests stay byte-identical.
HOST_FLAGS = ("-std=c99", "-O2", "-fPIC", *STRICT_WARNINGS)


def cdef_for(rec: CRecord) -> str:
    """Return the cffi declarations of one layer's C entry points."""
    t, prefix = rec.ctype, rec.plan.prefix
    sizes = "".join(f", size_t {r.name}" for r in rec.plan.runtime_sizes)
    fusion = "".join(f", {'' if n == 'sum' else 'const '}{t} *{n}"
                     for n in rec.plan.layer.fusion_args)
    text = (f"int {prefix}_predict(const {t} *x, {t} *y, size_t batch{sizes}{fusion});\n"
            f"int {prefix}_predict_with_params(const {t} *x, {t} *y, size_t batch{sizes}, "
            f"const {t} *scale, const {t} *offset{fusion});\n")
    return text + (train_cdef(rec.plan.layer, t, prefix, sizes) if rec.plan.layer.training
                   else "")


def train_cdef(layer, t: str, prefix: str, sizes: str, a: str | None = None) -> str:
    """Return the declarations of a training layer's entry points (element type t, the
    statistics' type a: t unless given), for cffi."""
    a = a or t
    fusion = "".join(f", {'' if n == 'sum' else 'const '}{t} *{n}" for n in layer.fusion_args)
    bwd = "".join(f", const {t} *{n}" for n in layer.fusion_args if n != "sum")
    dada = f", {t} *dada_scale, {t} *dada_shift" if layer.adaptive else ""
    return (f"int {prefix}_forward_train(const {t} *x, {t} *y, size_t batch{sizes}, "
            f"const {t} *scale, const {t} *offset{fusion}, {a} *mean, {a} *rstd);\n"
            f"int {prefix}_backward(const {t} *x, const {t} *dy, {t} *dx, {t} *dscale, "
            f"{t} *doffset{dada}, size_t batch{sizes}, const {t} *scale, const {t} *offset{bwd}, "
            f"const {a} *mean, const {a} *rstd);\n"
            f"int {prefix}_sgdm_update({t} *scale, {t} *offset, {t} *scale_velocity, "
            f"{t} *offset_velocity, const {t} *dscale, const {t} *doffset, {t} learn_rate, "
            f"{t} momentum, {t} l2_regularization);\n"
            f"int {prefix}_adam_update({t} *scale, {t} *offset, {t} *scale_m, {t} *offset_m, "
            f"{t} *scale_v, {t} *offset_v, const {t} *dscale, const {t} *doffset, "
            f"unsigned long step, {t} learn_rate, {t} beta1, {t} beta2, {t} epsilon, "
            f"{t} l2_regularization);\n"
            f"int {prefix}_rmsprop_update({t} *scale, {t} *offset, {t} *scale_sq, {t} *offset_sq, "
            f"const {t} *dscale, const {t} *doffset, {t} learn_rate, {t} rho, {t} epsilon, "
            f"{t} l2_regularization);\n")


def with_openmp(layers: tuple[CRecord | Plan, ...], flags: tuple[str, ...]) -> tuple[str, ...]:
    """Return flags plus -fopenmp when a layer asks for threads (the C guards it by _OPENMP)."""
    if any(as_record(r).kernel.threads > 1 for r in layers) and "-fopenmp" not in flags:
        return (*flags, "-fopenmp")
    return flags


@dataclass(frozen=True)
class BuiltModule:
    """A compiled cffi module: its folder in the cache and the loaded ffi/lib pair."""

    path: Path
    ffi: object
    lib: object


def build_c_module(layers: tuple[CRecord | Plan, ...], sources: list[Source],
                   flags: tuple[str, ...] = HOST_FLAGS, cc: str = "cc",
                   keep: bool = False) -> BuiltModule:
    """Return the cffi module that exposes every layer's entry points, building it if needed."""
    recs = tuple(as_record(item) for item in layers)
    cc_version = compiler_version(cc)
    flags = with_openmp(recs, flags)
    cdef = "".join(cdef_for(r) for r in recs)
    key = content_key([__version__, cc, cc_version, sys.version, cffi.__version__, " ".join(flags),
                cdef, *(f"{s.name}\n{s.text}" for s in sources)])
    module_name = f"_gncodegen_{key}"
    folder = cache_root() / key
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    target = folder / f"{module_name}{suffix}"
    if not target.is_file():
        _compile_module(module_name, cdef, recs, sources, flags, cc, folder, target.name)
    spec = importlib.util.spec_from_file_location(module_name, target)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if keep:
        print(f"build folder: {folder}", file=sys.stderr)
    return BuiltModule(folder, module.ffi, module.lib)


def _compile_module(module_name: str, cdef: str, recs, sources, flags, cc, folder: Path,
                    filename: str) -> None:
    with staged_entry(folder, filename) as work:
        write_sources(work, sources)
        objects = []
        for s in sources:
            if s.name.endswith(".c"):
                obj = s.name[:-2] + ".o"
                run_compiler(s.name, [cc, *flags, "-c", s.name, "-o", obj], cwd=work)
                objects.append(obj)
        ffi = cffi.FFI()
        ffi.cdef(cdef)
        ffi.set_source(module_name, "".join(f'#include "{r.plan.prefix}.h"\n' for r in recs))
        with contextlib.redirect_stdout(io.StringIO()):  # cffi announces what it writes
            ffi.emit_c_code(str(work / f"{module_name}.c"))
        py_include = sysconfig.get_paths()["include"]
        run_compiler("cffi wrapper", [cc, "-O1", "-fPIC", f"-I{py_include}", "-I.", "-c",
                                      f"{module_name}.c", "-o", f"{module_name}.o"], cwd=work)
        openmp = [f for f in flags if f == "-fopenmp"]
        run_compiler("link", [cc, "-shared", *openmp, f"{module_name}.o", *objects, "-lm",
                              "-o", filename], cwd=work)


def c_runner(layer: CRecord | Plan, module) -> Runner:
    """Return a Runner that calls a layer's C entry points in a built cffi module."""
    ffi, lib = module.ffi, module.lib
    rec = as_record(layer)
    plan = rec.plan
    np_dtype = plan.dtype.numpy
    ctype = rec.ctype
    predict = getattr(lib, f"{plan.prefix}_predict")
    predict_with = getattr(lib, f"{plan.prefix}_predict_with_params")

    def buffer(values) -> object:
        return ffi.from_buffer(f"{ctype}[]", np.ascontiguousarray(values, dtype=np_dtype))

    def run(case: Case):
        x = np.array(case.x, dtype=np_dtype)  # a copy: in-place cases must not touch case.x
        y = x if case.in_place else np.full_like(x, np.nan)
        px = ffi.from_buffer(f"{ctype}[]", x)
        py = px if case.in_place else ffi.from_buffer(f"{ctype}[]", y)
        written = np.full_like(x, np.nan) if case.want_sum else None
        given = case.fusion_values()
        fusion = [ffi.from_buffer(f"{ctype}[]", written) if name == "sum" and case.want_sum
                  else ffi.NULL if name == "sum" else buffer(given[name])
                  for name in plan.layer.fusion_args]
        if case.scale is None:
            rc = predict(px, py, case.batch, *case.sizes, *fusion)
        else:
            rc = predict_with(px, py, case.batch, *case.sizes, buffer(case.scale),
                              buffer(case.offset), *fusion)
        if rc != 0:
            raise RuntimeError(f"{plan.prefix}_predict returned {rc}")
        return y if written is None else (y, written)

    return run


# The state arrays of each solver's update, in its argument order after scale and offset.
SOLVER_STATE = {"sgdm": ("scale_velocity", "offset_velocity"),
                "adam": ("scale_m", "offset_m", "scale_v", "offset_v"),
                "rmsprop": ("scale_sq", "offset_sq")}


def c_train_runners(layer: CRecord | Plan, module) -> tuple[TrainRunner, SolverRunner]:
    """Return the runners of a training layer's entry points in a built cffi module."""
    ffi, lib = module.ffi, module.lib
    rec = as_record(layer)
    plan = rec.plan
    lay = plan.layer
    np_dtype = plan.dtype.numpy
    ctype = rec.ctype
    prefix = plan.prefix

    def buf(arr: np.ndarray):
        return ffi.from_buffer(f"{ctype}[]", arr)

    def own(values) -> np.ndarray:
        return np.array(values, dtype=np_dtype)  # a copy the call may write

    def call(name: str, *args) -> None:
        rc = getattr(lib, f"{prefix}_{name}")(*args)
        if rc != 0:
            raise RuntimeError(f"{prefix}_{name} returned {rc}")

    def run(tc: TrainCase) -> TrainOutputs:
        case = tc.case
        x = own(case.x)
        y = x if case.in_place else np.full_like(x, np.nan)
        stats = case.batch * lay.num_groups
        mean, rstd = np.full(stats, np.nan, np_dtype), np.full(stats, np.nan, np_dtype)
        scale, offset = own(case.scale), own(case.offset)
        given = case.fusion_values()
        written = np.full_like(x, np.nan) if case.want_sum else None
        fusion = [buf(written) if n == "sum" and written is not None else
                  ffi.NULL if n == "sum" else buf(own(given[n])) for n in lay.fusion_args]
        call("forward_train", buf(x), buf(y), case.batch, *case.sizes, buf(scale), buf(offset),
             *fusion, buf(mean), buf(rstd))
        # backward from the original x (forward_train in place overwrote its copy); in
        # place, dx overwrites dy
        x = own(case.x)
        dy = own(tc.dy)
        dx = dy if case.in_place else np.full_like(x, np.nan)
        dscale = np.full(lay.num_channels, np.nan, np_dtype)
        doffset = np.full_like(dscale, np.nan)
        dada = [np.full(case.batch * lay.num_channels, np.nan, np_dtype) for _ in range(2)
                ] if lay.adaptive else []
        bwd = [buf(own(given[n])) for n in lay.fusion_args if n != "sum"]
        call("backward", buf(x), buf(dy), buf(dx), buf(dscale), buf(doffset),
             *(buf(d) for d in dada), case.batch, *case.sizes, buf(scale), buf(offset), *bwd,
             buf(mean), buf(rstd))
        return TrainOutputs(y, mean, rstd, dx, dscale, doffset, *(dada or (None, None)),
                            sum=written)

    def solve(s: SolverInputs) -> dict:
        out = {"scale": own(s.scale), "offset": own(s.offset),
               **{k: own(s.state[k]) for k in SOLVER_STATE[s.solver]}}
        call(f"{s.solver}_update", *(buf(out[k]) for k in ("scale", "offset",
                                                            *SOLVER_STATE[s.solver])),
             buf(own(s.dscale)), buf(own(s.doffset)), *s.hyper.values())
        return out

    return run, solve
