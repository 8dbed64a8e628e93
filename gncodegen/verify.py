"""Verification: run built code on seeded inputs and on the numerics edge cases (random data,
constant groups, a large mean, the caller's parameters, batch 1 and more, in place), and compare
with the float64 reference under the dtype's tolerance."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

from .dtypes import dtype
from .reference import canonical, from_canonical, group_norm_reference, to_flat, to_logical
from .spec import Layer

# Largest batch the verification uses: bounded so a case stays a few MiB.
MAX_VERIFY_ELEMENTS = 1 << 21


@dataclass(frozen=True)
class Case:
    """One verification input: a flat buffer in the layer's layout, already in its dtype."""

    name: str
    x: np.ndarray               # float64 values exactly representable in the dtype
    batch: int
    in_place: bool = False
    scale: np.ndarray | None = None   # None: the baked parameters (<name>_predict)
    offset: np.ndarray | None = None


@dataclass(frozen=True)
class CaseResult:
    """How one case compared with the reference."""

    case: str
    max_abs: float
    max_rel: float
    nan_mismatch: int
    passed: bool


@dataclass(frozen=True)
class Report:
    """The verification of one layer on one target."""

    layer: str
    target: str
    runner: str                 # how it ran: host, host-emulation, gpu, qemu-..., ...
    tolerance: float
    cases: tuple[CaseResult, ...]

    @property
    def passed(self) -> bool:
        """True when every case passed."""
        return all(c.passed for c in self.cases)

    @property
    def max_rel(self) -> float:
        """The worst relative error over the cases."""
        return max((c.max_rel for c in self.cases), default=0.0)

    def as_dict(self) -> dict:
        """Return the figures as plain data for the manifest."""
        return {
            "layer": self.layer, "target": self.target, "runner": self.runner,
            "tolerance": self.tolerance, "passed": self.passed,
            "max_rel_error": float(f"{self.max_rel:.3g}"),
            "cases": {c.case: float(f"{c.max_rel:.3g}") for c in self.cases},
        }


def verification_batch(layer: Layer, wanted: int) -> int:
    """Return the batch to use for a case: 1 without B, else wanted capped by the size budget."""
    if not layer.has_batch:
        return 1
    return max(1, min(wanted, MAX_VERIFY_ELEMENTS // layer.observation_numel))


def _per_group(layer: Layer, batch: int, fill: Callable[[np.random.Generator, int], np.ndarray],
               rng: np.random.Generator) -> np.ndarray:
    """Return a flat buffer whose every (observation, group) is filled by fill(rng, count)."""
    n = batch
    c = layer.num_channels
    r = layer.observation_numel // c
    g = layer.num_groups
    canon = np.empty((n, g, (c // g) * r))
    for i in range(n):
        for j in range(g):
            canon[i, j] = fill(rng, canon.shape[2])
    return to_flat(from_canonical(canon.reshape(n, c, r), layer, batch), layer)


def make_cases(layer: Layer, seed: int = 0, max_batch: int = 4) -> list[Case]:
    """Return the verification cases for a layer, seeded, rounded to its dtype."""
    rng = np.random.default_rng(seed)
    dt = dtype(layer.dtype)
    numel = layer.observation_numel

    def normal(batch, loc=0.0, sd=1.0):
        return dt.round(rng.normal(loc, sd, batch * numel))

    b1 = 1
    bmax = verification_batch(layer, max_batch)
    big_mean = dt.big_mean
    cases = [
        Case("random, batch 1", normal(b1), b1),
        Case("random, in place", normal(bmax), bmax, in_place=True),
        Case("constant groups", dt.round(
            _per_group(layer, bmax, lambda r, k: np.full(k, r.normal(0, 3)), rng)), bmax),
        Case(f"mean {big_mean:g}, std 1", normal(bmax, big_mean, 1.0), bmax),
        Case("caller's scale and offset", normal(bmax), bmax,
             scale=dt.round(rng.normal(1.0, 0.5, layer.num_channels)),
             offset=dt.round(rng.normal(0.0, 0.5, layer.num_channels))),
    ]
    if bmax > 1:
        cases.insert(1, Case(f"random, batch {bmax}", normal(bmax), bmax))
    return cases


def compare(y: np.ndarray, ref: np.ndarray, tolerance: float, name: str) -> CaseResult:
    """Return how y compares with the reference; a NaN the reference lacks always fails."""
    y = np.asarray(y, dtype=np.float64)
    y_nan, r_nan = np.isnan(y), np.isnan(ref)
    nan_mismatch = int(np.count_nonzero(y_nan != r_nan))
    finite = ~(y_nan | r_nan)
    same_inf = np.isinf(ref[finite]) & (y[finite] == ref[finite])
    diff = np.where(same_inf, 0.0, np.abs(y[finite] - ref[finite]))
    max_abs = float(diff.max()) if diff.size else 0.0
    ref_finite = np.abs(ref[np.isfinite(ref)])
    scale = float(ref_finite.max()) if ref_finite.size else 0.0
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else np.inf)
    passed = nan_mismatch == 0 and max_rel <= tolerance
    return CaseResult(name, max_abs, float(max_rel), nan_mismatch, passed)


# A runner takes (case) and returns the output buffer as float64.
Runner = Callable[[Case], np.ndarray]


def verify_layer(layer: Layer, target: str, runner_name: str, run: Runner,
                 cases: Iterable[Case] | None = None) -> Report:
    """Return the Report of running every case through run() against the reference."""
    dt = dtype(layer.dtype)
    tol = dt.tolerance
    results = []
    for case in (make_cases(layer) if cases is None else cases):
        scale = dt.round(layer.scale) if case.scale is None else case.scale
        offset = dt.round(layer.offset) if case.offset is None else case.offset
        ref = group_norm_reference(case.x, layer, case.batch, scale, offset)
        results.append(compare(run(case), ref, tol, case.name))
    return Report(layer.name, target, runner_name, tol, tuple(results))


__all__ = ["Case", "CaseResult", "Report", "make_cases", "compare", "verify_layer",
           "verification_batch", "canonical", "to_logical"]
