"""report.html: the code-generation report a build writes beside its sources, one file with
nothing to fetch (as MATLAB Coder's report is): the resolved layers, each target's choices, the
verification figures with a plot of every case's error against the tolerance, the firmware
footprint, and every source with line numbers. The same build gives the same bytes."""

from __future__ import annotations

import hashlib
import json
import math

from .describe import choice_lines, layer_rows, option_rows
from .plan import lower_spec
from .render import render_template
from .spec import Spec

REPORT = "report.html"
# The plot's error axis: powers of ten from the first to the last (an exact 0 sits at the
# bottom).
PLOT_DECADES = (-17, 0)


def _targets_choices(spec: Spec, target_names: list[str]) -> list[dict]:
    """Return each target's options and choices per layer, as `gncodegen show` prints them."""
    from .targets import TARGETS

    plans = lower_spec(spec)
    out = []
    for name in target_names:
        target = TARGETS.get(name)
        if target is None:
            continue
        layers = [{"name": plan.prefix, "options": option_rows(target, plan),
                   "lines": choice_lines(target, target.lower(plan), plan)}
                  for plan in plans]
        out.append({"name": name, "description": target.description, "layers": layers})
    return out


def _plot(cases: dict[str, float], tolerance: float) -> dict:
    """Return an SVG bar chart's geometry: one bar per case, its height the log of the case's
    relative error, and the tolerance as a line."""
    lo, hi = PLOT_DECADES
    width, height, left, bottom, top = 640, 170, 52, 24, 10
    plot_h = height - bottom - top
    names = list(cases)
    step = (width - left - 10) / max(1, len(names))

    def y_of(value: float) -> float:
        if not value > 0:
            return float(height - bottom)
        e = min(max(math.log10(value), lo), hi)
        return round(top + plot_h * (hi - e) / (hi - lo), 1)

    bars = []
    for i, name in enumerate(names):
        value = cases[name]
        y = y_of(value)
        bars.append({"x": round(left + i * step + step * 0.15, 1), "y": y, "index": i + 1,
                     "mid": round(left + i * step + step * 0.5, 1),
                     "w": round(step * 0.7, 1), "h": round(height - bottom - y, 1),
                     "name": name, "value": f"{value:.3g}",
                     "over": not value <= tolerance})
    ticks = [{"y": y_of(10.0 ** e), "label": f"1e{e}"} for e in range(lo, hi + 1, 4)]
    return {"width": width, "height": height, "left": left, "bottom": height - bottom,
            "bars": bars, "ticks": ticks, "tolerance_y": y_of(tolerance),
            "tolerance": f"{tolerance:g}"}


def render_report(spec: Spec, files: dict[str, str], manifest: dict) -> str:
    """Return report.html for a folder's files and its manifest (as merged for writing)."""
    layers = [{"name": plan.prefix, "rows": layer_rows(plan), "plan": list(plan.summary)}
              for plan in lower_spec(spec)]
    verification = []
    for v in manifest.get("verification", []):
        verification.append({**v, "plot": _plot(v.get("cases", {}), v["tolerance"])})
    footprints = []
    for target in manifest.get("targets", []):
        section = manifest.get(target)
        if isinstance(section, dict) and "footprint" in section:
            for name, fp in section["footprint"].items():
                footprints.append({"target": target, "layer": name, **fp})
    sources = []
    for name in sorted(files):
        if name == REPORT:
            continue
        lines = files[name].split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        sources.append({"name": name, "lines": lines,
                        "sha256": hashlib.sha256(files[name].encode()).hexdigest()})
    return render_template("common/report.html.j2", spec=manifest["spec"],
                           generator=manifest["generator"], targets=manifest.get("targets", []),
                           layers=layers, choices=_targets_choices(spec, manifest.get(
                               "targets", [])), verification=verification,
                           footprints=footprints, sources=sources)


def with_report(spec: Spec, files: dict[str, str], manifest_text: str
                ) -> tuple[dict[str, str], str]:
    """Return the files with report.html among them, and the manifest listing it too."""
    doc = json.loads(manifest_text)
    text = render_report(spec, files, doc)
    files = {**files, REPORT: text}
    doc["files"] = {name: hashlib.sha256(files[name].encode()).hexdigest()
                    for name in sorted(files)}
    return files, json.dumps(doc, indent=2, sort_keys=False) + "\n"
