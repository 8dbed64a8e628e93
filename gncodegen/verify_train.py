"""Verification of a training layer's entry points: forward_train, backward and the solvers'
updates, on the forward's own cases (random data, constant groups, a large mean, the caller's
parameters, the activation's regions, every runtime size), each with a random gradient dy,
against the float64 reference of gncodegen.training.

A target supplies two callables: one runs forward_train then backward on a TrainCase and
returns TrainOutputs; the other runs one solver's update on SolverInputs and returns the
updated arrays by name.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Iterable, Iterator

import numpy as np

from .dtypes import dtype
from .spec import Layer
from .training import (adam_reference, reference_backward, rmsprop_reference, sgdm_reference,
                       train_statistics)
from .verify import (Case, CaseResult, _normal, compare, compare_sum, compare_with_reference,
                     iter_cases)

# The forward cases whose inputs the training entry points are verified on (by name, before
# any runtime sizes are added to it): the in-place ones also run backward with dx == dy, a
# skip layer's "skip without sum" forward_train with sum NULL.
TRAIN_CASES = ("random, batch 1", "random, in place", "constant groups", "mean ",
               "caller's scale and offset", "activation regions", "skip without sum")
SOLVERS = ("sgdm", "adam", "rmsprop")


@dataclass(frozen=True)
class TrainCase:
    """One training step's inputs: the forward case (scale and offset always given) and dy."""

    case: Case
    dy: np.ndarray              # the loss's gradient at y, like x, in the storage type

    @property
    def name(self) -> str:
        return self.case.name


@dataclass(frozen=True)
class TrainOutputs:
    """What forward_train and backward wrote for one TrainCase."""

    y: np.ndarray
    mean: np.ndarray
    rstd: np.ndarray
    dx: np.ndarray
    dscale: np.ndarray
    doffset: np.ndarray
    dada_scale: np.ndarray | None = None
    dada_shift: np.ndarray | None = None
    sum: np.ndarray | None = None   # forward_train's x + skip (a skip layer)


@dataclass(frozen=True)
class SolverInputs:
    """One solver update's inputs: the parameters, their state (by the entry point's argument
    names, e.g. scale_velocity), their gradients and the hyperparameters."""

    solver: str
    scale: np.ndarray
    offset: np.ndarray
    state: dict
    dscale: np.ndarray
    doffset: np.ndarray
    hyper: dict                 # learn_rate, momentum, ..., in the entry point's order


TrainRunner = Callable[[TrainCase], TrainOutputs]
SolverRunner = Callable[[SolverInputs], dict]


def train_cases(layer: Layer, seed: int = 0, max_batch: int = 4) -> Iterator[TrainCase]:
    """Yield the training cases: the forward cases named in TRAIN_CASES, at every runtime size
    set, with the baked parameters made explicit and a seeded random dy."""
    dt = dtype(layer.dtype)
    for k, case in enumerate(iter_cases(layer, seed, max_batch)):
        if not case.name.startswith(TRAIN_CASES):
            continue
        if case.scale is None:
            case = replace(case, scale=dt.round(layer.scale), offset=dt.round(layer.offset))
        rng = np.random.default_rng((seed, 300 + k))
        yield TrainCase(case, _normal(rng, case.x.size, dt.numpy))


def solver_inputs(layer: Layer, seed: int = 0) -> Iterator[SolverInputs]:
    """Yield one update of each solver from a random state (Adam at step 3). The rates are
    large enough that every term of each formula moves the result beyond the dtype's
    tolerance (an update of about 0.1 against parameters near 1, an epsilon of 0.1 beside
    sqrt(v) of about 0.3, an L2 term of a few hundredths), and the hyperparameters are values
    of the accumulation type, as the entry points take them."""
    dt = dtype(layer.dtype)
    hyper_type = dt.accumulator
    c = layer.num_channels
    for k, solver in enumerate(SOLVERS):
        rng = np.random.default_rng((seed, 400 + k))

        def draw(sd: float = 1.0, positive: bool = False) -> np.ndarray:
            v = rng.normal(0.0, sd, c)
            return dt.round(np.abs(v) if positive else v)

        if solver == "sgdm":
            state = {"scale_velocity": draw(0.1), "offset_velocity": draw(0.1)}
            hyper = {"learn_rate": 0.1, "momentum": 0.9, "l2_regularization": 0.05}
        elif solver == "adam":
            state = {"scale_m": draw(0.1), "offset_m": draw(0.1), "scale_v": draw(0.1, True),
                     "offset_v": draw(0.1, True)}
            hyper = {"step": 3, "learn_rate": 1.0, "beta1": 0.9, "beta2": 0.99,
                     "epsilon": 0.1, "l2_regularization": 0.05}
        else:
            state = {"scale_sq": draw(0.1, True), "offset_sq": draw(0.1, True)}
            hyper = {"learn_rate": 0.1, "rho": 0.9, "epsilon": 0.1, "l2_regularization": 0.05}
        hyper = {k: (v if k == "step" else float(hyper_type.round(np.float64(v))))
                 for k, v in hyper.items()}
        yield SolverInputs(solver, draw(0.5) + dt.round(np.ones(c)), draw(0.5), state,
                           draw(), draw(), hyper)


def solver_reference(layer: Layer, s: SolverInputs) -> dict:
    """Return the float64 reference of one update, by the entry point's argument names."""
    args = (layer, s.scale, s.offset)
    if s.solver == "sgdm":
        names = ("scale", "offset", "scale_velocity", "offset_velocity")
        out = sgdm_reference(*args, s.state["scale_velocity"], s.state["offset_velocity"],
                             s.dscale, s.doffset, **s.hyper)
    elif s.solver == "adam":
        names = ("scale", "offset", "scale_m", "offset_m", "scale_v", "offset_v")
        out = adam_reference(*args, s.state["scale_m"], s.state["offset_m"], s.state["scale_v"],
                             s.state["offset_v"], s.dscale, s.doffset, **s.hyper)
    else:
        names = ("scale", "offset", "scale_sq", "offset_sq")
        out = rmsprop_reference(*args, s.state["scale_sq"], s.state["offset_sq"], s.dscale,
                                s.doffset, **s.hyper)
    return dict(zip(names, out))


def verify_training(layer: Layer, run: TrainRunner, solve: SolverRunner,
                    cases: Iterable[TrainCase] | None = None) -> tuple[CaseResult, ...]:
    """Return the results of every training case and solver update against the reference:
    forward_train's y (and a skip layer's sum, bit for bit), mean and rstd, backward's dx and
    parameter gradients, and each solver's updated parameters and state. Their names start
    with "train: "."""
    dt = dtype(layer.dtype)
    tol = dt.tolerance
    unit = float(np.finfo(dt.accumulator.numpy).eps)  # a unit in the saved mean's last place
    results: list[CaseResult] = []
    for tc in (train_cases(layer) if cases is None else cases):
        case = tc.case
        fixed = layer.at_sizes(case.sizes) if layer.runtime_sizes else layer
        out = run(tc)
        name = f"train: {case.name}"
        results.append(replace(compare_with_reference(out.y, case, fixed, case.scale,
                                                      case.offset, tol),
                               case=f"{name}: y"))
        if case.want_sum:
            if out.sum is None:
                raise RuntimeError(f"{layer.name}: forward_train of {case.name!r} returned no sum")
            results.append(replace(compare_sum(out.sum, case, fixed), case=f"{name}: sum"))
        mean, rstd = train_statistics(case.x, fixed, case.batch, skip=case.skip)
        results.append(_compare_mean(out.mean, mean, rstd, tol, unit, f"{name}: mean"))
        results.append(compare(out.rstd, rstd, tol, f"{name}: rstd"))
        ref = reference_backward(fixed, case.x, tc.dy, case.batch, case.scale, case.offset,
                                 skip=case.skip, ada_scale=case.ada_scale,
                                 ada_shift=case.ada_shift)
        for key in ("dx", "dscale", "doffset") + (("dada_scale", "dada_shift")
                                                  if layer.adaptive else ()):
            result = compare(getattr(out, key), ref[key], tol, f"{name}: {key}")
            if key == "dx" and result.max_rel > 0:
                # against the terms dx is made of, where they cancel (a group of few elements)
                rel = result.max_abs / max(result.max_abs / result.max_rel, ref["dx_terms"])
                result = replace(result, max_rel=rel,
                                 passed=result.nan_mismatch == 0 and rel <= tol)
            results.append(result)
        del out, ref
    for s in solver_inputs(layer):
        got = solve(s)
        for key, want in solver_reference(layer, s).items():
            results.append(compare(got[key], want, tol, f"train: {s.solver}_update: {key}"))
    return tuple(results)


def _compare_mean(got: np.ndarray, want: np.ndarray, rstd: np.ndarray, tol: float,
                  unit: float, name: str) -> CaseResult:
    """Return how saved means compare. The saved mean is one value of the accumulation type,
    so it holds a mean of 1e4 only to its last place (`unit` times |mean|, one rounding of the
    sum that makes it besides the rounding to store it): each error is taken in units of the
    group's standard deviation plus that place over the tolerance, so it passes at a unit in
    the last place and fails at a few."""
    got = np.asarray(got, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        err = np.abs(got - want) / (1.0 / rstd + np.abs(want) * unit / tol)
    nan_mismatch = int(np.count_nonzero(np.isnan(got) != np.isnan(want)))
    worst = float(np.nanmax(err)) if err.size and not np.all(np.isnan(err)) else 0.0
    passed = nan_mismatch == 0 and worst <= tol
    max_abs = float(np.nanmax(np.abs(got - want))) if got.size and worst else 0.0
    return CaseResult(name, max_abs, worst, nan_mismatch, passed)
