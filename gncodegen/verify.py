"""Verification: run built code on seeded inputs and on the numerics edge cases (random data,
constant groups, a large mean, the caller's parameters, batch 1 and more, in place), and compare
with the float64 reference under the dtype's tolerance."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Iterator

import numpy as np

from .dtypes import dtype
from .errors import TargetUnavailable
from .reference import (canonical, group_channel_axis, group_indices, reference_pieces,
                        skip_sum, to_logical)
from .spec import Layer

# Largest batch the verification uses: bounded so a case stays a few MiB.
MAX_VERIFY_ELEMENTS = 1 << 21
# Random values are drawn this many at a time, so a case costs its own bytes and no float64 copy.
DRAW_CHUNK = 1 << 20


@dataclass(frozen=True)
class Case:
    """One verification input: a flat buffer in the layer's layout."""

    name: str
    x: np.ndarray               # in the layer's storage type (or float64 values exact in it)
    batch: int
    in_place: bool = False
    scale: np.ndarray | None = None   # None: the baked parameters (<name>_predict)
    offset: np.ndarray | None = None
    sizes: tuple[int, ...] = ()       # the runtime sizes of the call (format order)
    skip: np.ndarray | None = None    # a skip layer's second input, like x
    want_sum: bool = False            # ... and whether the call asks for x + skip (else NULL)
    ada_scale: np.ndarray | None = None   # an adaptive layer's batch x channels modulation
    ada_shift: np.ndarray | None = None

    def fusion_values(self) -> dict[str, np.ndarray | None]:
        """Return the case's fusion inputs by argument name (sum: None, the runner's to fill)."""
        return {"skip": self.skip, "sum": None, "ada_scale": self.ada_scale,
                "ada_shift": self.ada_shift}


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
    build: tuple[tuple[str, str], ...] = ()   # how what ran was built: compiler, flags, ...

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
            **({"build": dict(self.build)} if self.build else {}),
        }


# What verifying holds besides a case's x and y: the reference's chunks, the interpreter.
VERIFY_BASE_BYTES = 256 << 20


# Runtime sizes are verified at 1, at this odd size (it leaves a remainder after any vector
# width; a bound below it is taken instead), and at each bound (an unbounded size at the
# larger odd size).
ODD_SIZE = 7
UNBOUNDED_SIZE = 37


def verification_sizes(layer: Layer) -> list[tuple[int, ...]]:
    """Return the runtime sizes a layer is verified at: all 1, all odd, then each bounded
    size at its bound (the others at 1), and every unbounded one at UNBOUNDED_SIZE."""
    sizes = layer.runtime_sizes
    sets = [tuple(1 for _ in sizes), tuple(min(ODD_SIZE, r.max or ODD_SIZE) for r in sizes)]
    for i, r in enumerate(sizes):
        if r.max is not None:
            sets.append(tuple(r.max if j == i else 1 for j in range(len(sizes))))
    if any(r.max is None for r in sizes):
        sets.append(tuple(UNBOUNDED_SIZE if r.max is None else 1 for r in sizes))
    return list(dict.fromkeys(sets))


def size_label(layer: Layer, sizes: tuple[int, ...]) -> str:
    """Return runtime sizes as a case name shows them: `s1=7 t=1`."""
    return " ".join(f"{r.name}={v}" for r, v in zip(layer.runtime_sizes, sizes))


def verification_bytes(layer: Layer, max_batch: int = 4) -> int:
    """Return about the most memory verifying a layer takes: one case at a time, its x, the
    output and a copy for the in-place case, in the storage type, with the reference's chunks."""
    if layer.runtime_sizes:
        return max(verification_bytes(layer.at_sizes(s), max_batch)
                   for s in verification_sizes(layer))
    numel = verification_batch(layer, max_batch) * layer.observation_numel
    # x, y and the in-place copy; with a skip also skip, sum and the reference's x + skip
    buffers = 6 if layer.skip else 3
    return buffers * numel * dtype(layer.dtype).bytes + VERIFY_BASE_BYTES


def available_memory() -> int:
    """Return the bytes this machine can still give a process (MemAvailable, else all RAM)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_verifiable(layer: Layer) -> None:
    """Refuse, before any work, a layer whose verification would not fit in this machine's
    memory; it can still be written without verification."""
    need, have = verification_bytes(layer), available_memory()
    if need > have:
        numel = (layer.observation_numel if not layer.runtime_sizes else
                 max(layer.at_sizes(s).observation_numel for s in verification_sizes(layer)))
        raise TargetUnavailable(
            f"layer '{layer.name}': verifying one observation of {numel} "
            f"elements needs about {need / 2**30:.1f} GiB, more than the {have / 2**30:.1f} GiB "
            "this machine has free (--no-verify writes the sources without verifying them)")


def verification_batch(layer: Layer, wanted: int) -> int:
    """Return the batch to use for a case: 1 without B, else wanted capped by the size budget."""
    if not layer.has_batch:
        return 1
    return max(1, min(wanted, MAX_VERIFY_ELEMENTS // layer.observation_numel))


def _normal(rng: np.random.Generator, count: int, storage: np.dtype, loc: float = 0.0,
            sd: float = 1.0) -> np.ndarray:
    """Return count normal draws rounded to the storage type, drawn a chunk at a time."""
    out = np.empty(count, dtype=storage)
    for start in range(0, count, DRAW_CHUNK):
        stop = min(count, start + DRAW_CHUNK)
        out[start:stop] = rng.normal(loc, sd, stop - start)
    return out


def _per_group(layer: Layer, batch: int, fill: Callable[[np.random.Generator, int], np.ndarray],
               rng: np.random.Generator, storage: np.dtype = np.dtype(np.float64)) -> np.ndarray:
    """Return a flat buffer (in storage) whose every (observation, group) is filled by
    fill(rng, count)."""
    out = np.empty(batch * layer.observation_numel, dtype=storage)
    view = to_logical(out, layer, batch)
    c_axis = group_channel_axis(layer)
    for _, idx in group_indices(layer, batch):
        sub = view[idx]
        canon = np.moveaxis(sub, c_axis, 0)  # (cpg, reduced...), as canonical() orders it
        canon[...] = np.asarray(fill(rng, sub.size)).reshape(canon.shape)
    return out


def iter_cases(layer: Layer, seed: int = 0, max_batch: int = 4) -> Iterator[Case]:
    """Yield the verification cases for a layer, one at a time, in its storage type.

    Each case draws from its own stream (seed, case number), so a case is the same whether or
    not the others were made, and only one case need be in memory at a time.
    """
    if layer.runtime_sizes:
        # Every case at each set of sizes, named by them; the call passes them on.
        for sizes in verification_sizes(layer):
            label = size_label(layer, sizes)
            for case in iter_cases(layer.at_sizes(sizes), seed, max_batch):
                yield replace(case, name=f"{case.name}, {label}", sizes=sizes)
        return
    storage = dtype(layer.dtype).numpy
    numel = layer.observation_numel
    bmax = verification_batch(layer, max_batch)

    def stream(k: int) -> np.random.Generator:
        return np.random.default_rng((seed, k))

    for k, case in enumerate(_plain_cases(layer, seed, max_batch)):
        yield _fused(layer, case, stream(100 + k), storage) if layer.fused else case
    if layer.skip:
        # sum NULL: x + skip goes through y (or, in place, through x itself)
        for k, in_place in enumerate((False, True)):
            case = Case(f"skip without sum{', in place' if in_place else ''}",
                        _normal(stream(7 + k), bmax * numel, storage), bmax, in_place=in_place)
            yield replace(_fused(layer, case, stream(9 + k), storage), want_sum=False)


def _plain_cases(layer: Layer, seed: int, max_batch: int) -> Iterator[Case]:
    """Yield the cases of every layer (fixed sizes), before any fusion inputs are added."""
    dt = dtype(layer.dtype)
    storage = dt.numpy
    numel = layer.observation_numel
    bmax = verification_batch(layer, max_batch)
    big_mean = dt.big_mean

    def stream(k: int) -> np.random.Generator:
        return np.random.default_rng((seed, k))

    yield Case("random, batch 1", _normal(stream(0), numel, storage), 1)
    if bmax > 1:
        yield Case(f"random, batch {bmax}", _normal(stream(1), bmax * numel, storage), bmax)
    yield Case("random, in place", _normal(stream(2), bmax * numel, storage), bmax, in_place=True)
    yield Case("constant groups", _per_group(layer, bmax, lambda r, k: np.full(k, r.normal(0, 3)),
                                             stream(3), storage), bmax)
    yield Case(f"mean {big_mean:g}, std 1",
               _normal(stream(4), bmax * numel, storage, big_mean, 1.0), bmax)
    rng = stream(5)
    yield Case("caller's scale and offset", _normal(rng, bmax * numel, storage), bmax,
               scale=dt.round(rng.normal(1.0, 0.5, layer.num_channels)),
               offset=dt.round(rng.normal(0.0, 0.5, layer.num_channels)))
    if layer.activation.fused:
        # z = scale*x^ + offset across about +-30: both sides of 0, a clipped ReLU's ceiling,
        # the saturation of sigmoid and tanh, elu's exponential side.
        rng = stream(6)
        c = layer.num_channels
        yield Case("activation regions", _normal(rng, bmax * numel, storage), bmax,
                   scale=dt.round(rng.choice([-1.0, 1.0], c) * rng.uniform(3.0, 8.0, c)),
                   offset=dt.round(rng.normal(0.0, 4.0, c)))


def _fused(layer: Layer, case: Case, rng: np.random.Generator, storage: np.dtype) -> Case:
    """Return a case with a fused layer's extra inputs: a skip of the same kind as x (constant
    per group where x is, so x + skip is too) with sum asked for, and a random modulation per
    observation and channel."""
    dt = dtype(layer.dtype)
    out = case
    if layer.skip:
        if case.name == "constant groups":
            skip = _per_group(layer, case.batch, lambda r, k: np.full(k, r.normal(0, 1)), rng,
                              storage)
        else:
            skip = _normal(rng, case.x.size, storage)
        out = replace(out, skip=skip, want_sum=True)
    if layer.adaptive:
        count = case.batch * layer.num_channels
        out = replace(out, ada_scale=dt.round(rng.normal(0.0, 0.5, count)),
                      ada_shift=dt.round(rng.normal(0.0, 0.5, count)))
    return out


def make_cases(layer: Layer, seed: int = 0, max_batch: int = 4) -> list[Case]:
    """Return every verification case for a layer (iter_cases, as a list)."""
    return list(iter_cases(layer, seed, max_batch))


class _Tally:
    """The running figures of comparing an output with the reference a piece at a time."""

    def __init__(self) -> None:
        self.max_abs = 0.0
        self.ref_max = 0.0
        self.nan_mismatch = 0

    def add(self, y: np.ndarray, ref: np.ndarray) -> None:
        """Fold one piece of the output and the same piece of the reference into the figures."""
        y = np.asarray(y, dtype=np.float64)
        y_nan, r_nan = np.isnan(y), np.isnan(ref)
        self.nan_mismatch += int(np.count_nonzero(y_nan != r_nan))
        finite = ~(y_nan | r_nan)
        yf, rf = y[finite], ref[finite]
        same_inf = np.isinf(rf) & (yf == rf)
        with np.errstate(invalid="ignore"):
            diff = np.where(same_inf, 0.0, np.abs(yf - rf))
        if diff.size:
            self.max_abs = max(self.max_abs, float(diff.max()))
        ref_finite = np.abs(rf[np.isfinite(rf)])
        if ref_finite.size:
            self.ref_max = max(self.ref_max, float(ref_finite.max()))

    def result(self, tolerance: float, name: str) -> CaseResult:
        """Return the CaseResult of everything added."""
        if self.ref_max > 0:
            max_rel = self.max_abs / self.ref_max
        else:
            max_rel = 0.0 if self.max_abs == 0 else math.inf
        passed = self.nan_mismatch == 0 and max_rel <= tolerance
        return CaseResult(name, self.max_abs, float(max_rel), self.nan_mismatch, passed)


def compare(y: np.ndarray, ref: np.ndarray, tolerance: float, name: str) -> CaseResult:
    """Return how y compares with the reference; a NaN the reference lacks always fails."""
    tally = _Tally()
    y, ref = np.ravel(y), np.ravel(np.asarray(ref, dtype=np.float64))
    for start in range(0, max(y.size, ref.size), DRAW_CHUNK):
        tally.add(y[start:start + DRAW_CHUNK], ref[start:start + DRAW_CHUNK])
    return tally.result(tolerance, name)


def compare_with_reference(y: np.ndarray, case: Case, layer: Layer, scale: np.ndarray,
                           offset: np.ndarray, tolerance: float) -> CaseResult:
    """Return how a case's output compares with the reference, computed a piece at a time
    beside it (no float64 copy of the whole output)."""
    tally = _Tally()
    x = case.x if case.skip is None else skip_sum(case.x, case.skip, dtype(layer.dtype).numpy)
    for y_piece, ref_piece in reference_pieces(x, layer, case.batch, scale, offset, like=y,
                                               ada_scale=case.ada_scale,
                                               ada_shift=case.ada_shift):
        tally.add(y_piece, ref_piece)
    return tally.result(tolerance, case.name)


def compare_sum(written: np.ndarray, case: Case, layer: Layer) -> CaseResult:
    """Return how a skip layer's sum output compares with x + skip rounded once to the storage
    type: it must be exactly that (any target adds two values of the type and rounds once)."""
    want = skip_sum(case.x, case.skip, dtype(layer.dtype).numpy)
    result = compare(written, want, 0.0, f"{case.name}: sum")
    exact = np.array_equal(np.asarray(written, dtype=np.float64), want.astype(np.float64),
                           equal_nan=True)
    return replace(result, passed=exact)


# A runner takes (case) and returns the output buffer (in the storage type, or float64), or
# (y, sum) for a case that asks for a skip layer's sum.
Runner = Callable[[Case], "np.ndarray | tuple[np.ndarray, np.ndarray]"]


def verify_layer(layer: Layer, target: str, runner_name: str, run: Runner,
                 cases: Iterable[Case] | None = None) -> Report:
    """Return the Report of running every case through run() against the reference."""
    dt = dtype(layer.dtype)
    tol = dt.tolerance
    results = []
    for case in (iter_cases(layer) if cases is None else cases):
        scale = dt.round(layer.scale) if case.scale is None else case.scale
        offset = dt.round(layer.offset) if case.offset is None else case.offset
        y = run(case)
        written = None
        if isinstance(y, tuple):
            y, written = y
        if case.want_sum and written is None:
            raise RuntimeError(f"{layer.name}: the {target} run of {case.name!r} returned no sum")
        if np.size(y) != np.size(case.x):
            raise RuntimeError(f"{layer.name}: the {target} run of {case.name!r} returned "
                               f"{np.size(y)} values for {np.size(case.x)}")
        fixed = layer.at_sizes(case.sizes) if layer.runtime_sizes else layer
        results.append(compare_with_reference(y, case, fixed, scale, offset, tol))
        if written is not None:
            results.append(compare_sum(written, case, fixed))
        del y, written, case  # the next case is made while these would still be held
    return Report(layer.name, target, runner_name, tol, tuple(results))


__all__ = ["Case", "CaseResult", "Report", "iter_cases", "make_cases", "compare",
           "compare_with_reference", "verify_layer",
           "verification_batch", "canonical", "to_logical"]
