"""The C target: portable C99 for the host, verified through a cffi build of the exact sources."""

from __future__ import annotations

from dataclasses import replace

from ...plan import Plan
from ...render import Source, render_template
from ...spec import Spec
from ..base import Outcome, RunOptions, Target
from ..cmake import render_cmake
from ...verify import Report, verify_layer
from ...verify_train import verify_training
from .record import THREADS, CRecord, as_record, lower_c
from .runner import build_c_module, c_runner, c_train_runners


def spec_file_name(spec: Spec) -> str:
    """Return the spec's file name as generated comments cite it."""
    return spec.path.replace("\\", "/").rsplit("/", 1)[-1]


def render_c(layer: CRecord | Plan, spec_name: str) -> tuple[Source, Source]:
    """Return the C header and source for one layer."""
    rec = as_record(layer)
    ctx = dict(plan=rec.plan, rec=rec, spec_name=spec_name)
    prefix = rec.plan.prefix
    return (Source(f"{prefix}.h", render_template("c/header.h.j2", **ctx)),
            Source(f"{prefix}.c", render_template("c/source.c.j2", **ctx)))


def c_sources(sources: list[Source], records: tuple[CRecord, ...]) -> list[Source]:
    """Return the layers' own C files among a build's sources (a build of several targets
    also holds a firmware project's program and start-up code)."""
    names = {f"{r.plan.prefix}{ext}" for r in records for ext in (".c", ".h")}
    return [s for s in sources if s.name in names]


class CTarget(Target):
    """Portable C99, built for this host through cffi and verified there."""

    name = "c"
    description = "portable C99 (host build through cffi)"
    dtypes = ("single", "double")
    spec_options = (THREADS,)

    def lower(self, plan: Plan) -> CRecord:
        return lower_c(plan)

    def render(self, spec: Spec, records: tuple[CRecord, ...]) -> list[Source]:
        """Return every layer's `<name>.h` and `<name>.c`, and the folder's CMakeLists.txt."""
        name = spec_file_name(spec)
        return [*(src for rec in records for src in render_c(rec, name)),
                render_cmake(tuple(r.plan for r in records), name, spec.stem)]

    def verify(self, spec: Spec, records: tuple[CRecord, ...], sources: list[Source],
               options: RunOptions) -> Outcome:
        module = build_c_module(records, c_sources(sources, records), keep=options.keep)
        return Outcome(tuple(with_training(r, verify_layer(r.plan.layer, "c", "host",
                                                           c_runner(r, module)), module)
                             for r in records))


def with_training(rec: CRecord, report: Report, module) -> Report:
    """Return a layer's report with its training entry points' cases added (a training layer)."""
    if not rec.plan.layer.training:
        return report
    run, solve = c_train_runners(rec, module)
    return replace(report, cases=report.cases + verify_training(rec.plan.layer, run, solve))


TARGET = CTarget()
