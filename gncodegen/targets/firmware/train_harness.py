"""The training image's harness: a training layer's cases (gncodegen.verify_train) and solver
inputs as exact C literals, and its printout read back.

The harness calls forward_train then backward on every training case and each solver's update
once, prints every output's bit pattern (and, on bare metal, the stack each call used), then
checks the training entry points' documented refusals: a NULL pointer (ERR_NULL) and Adam's
step 0 (ERR_STEP), none of which may write an output.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from ... import __version__
from ...dtypes import dtype
from ...errors import TargetUnavailable, VerificationError
from ...plan import Plan
from ...render import Source, render_template
from ...spec import Layer
from ...verify_train import SolverInputs, TrainCase, TrainOutputs, solver_inputs, train_cases
from ..c.record import CRecord, as_record
from ..c.runner import SOLVER_STATE
from .boards import KiB, MiB, Board
from .harness import HEX_PER_LINE, HOSTED_CASE_BYTES, hex_literal

# forward_train's only pointer that may be NULL: a skip layer's sum (then not written).
OPTIONAL_POINTERS = frozenset({"sum"})


def forward_args(layer: Layer) -> tuple[str, ...]:
    """Return forward_train's arguments by name, in order (as the header declares them)."""
    return ("x", "y", "batch", *(r.name for r in layer.runtime_sizes), "scale", "offset",
            *layer.fusion_args, "mean", "rstd")


def backward_args(layer: Layer) -> tuple[str, ...]:
    """Return backward's arguments by name, in order."""
    dada = ("dada_scale", "dada_shift") if layer.adaptive else ()
    return ("x", "dy", "dx", "dscale", "doffset", *dada, "batch",
            *(r.name for r in layer.runtime_sizes), "scale", "offset",
            *(n for n in layer.fusion_args if n != "sum"), "mean", "rstd")


def solver_args(s: SolverInputs) -> tuple[str, ...]:
    """Return a solver's update arguments by name, in order: the parameters, their state, the
    gradients, then the hyperparameters (SolverInputs.hyper holds them in that order)."""
    return ("scale", "offset", *SOLVER_STATE[s.solver], "dscale", "doffset", *s.hyper)


def _pointers(names: tuple[str, ...], scalars: set[str]) -> tuple[str, ...]:
    """Return the pointer arguments among names: all but the scalars given."""
    return tuple(n for n in names if n not in scalars)


# A call's lines are filled to this many characters after the statement's own start (at most
# "    if (" or "    rc[0] = "), its continuation lines indented two levels.
CALL_WIDTH = 78


def _call(prefix: str, entry: str, names: tuple[str, ...], values: dict[str, str]) -> str:
    """Return the C call of one entry point, each argument's expression by its name, broken
    after commas to stay within CALL_WIDTH."""
    args = [values[n] for n in names]
    lines, line = [], f"{prefix}_{entry}({args[0]}"
    for arg in args[1:]:
        if len(line) + len(arg) + 3 > CALL_WIDTH:
            lines.append(line + ",")
            line = "        " + arg
        else:
            line += ", " + arg
    return "\n".join([*lines, line + ")"])


@dataclass(frozen=True)
class TrainHarnessCase:
    """One training case as the harness holds it: its inputs as exact C literals."""

    name: str
    batch: int
    in_place: bool              # forward_train with y == x, backward with dx == dy
    numel: int
    stats: int                  # batch * groups: the saved means (and rstds)
    modulated: int              # batch * channels: an adaptive layer's dada_scale (0 else)
    want_sum: bool
    sizes: tuple[int, ...]
    arrays: tuple[tuple[str, tuple[str, ...]], ...]   # (x, dy, scale, ...) -> literals


@dataclass(frozen=True)
class TrainHarnessSolver:
    """One solver update as the harness holds it: its inputs as literals, and its call."""

    solver: str
    state: tuple[str, ...]                            # the state arrays' names, in order
    arrays: tuple[tuple[str, tuple[str, ...]], ...]   # scale, offset, state..., dscale, doffset
    call: str                                         # on the harness's solver buffers

    @property
    def buffers(self) -> tuple[str, ...]:
        """The arrays the update writes, in solver_work's rows: scale, offset, the state."""
        return ("scale", "offset", *self.state)


@dataclass(frozen=True)
class ApiCheck:
    """One refusal the harness checks: a call and the return code it must give."""

    call: str
    expect: str        # the code's macro suffix: ERR_NULL, ERR_STEP
    what: str          # what the call leaves out, for the failure line


@dataclass(frozen=True)
class TrainHarness:
    """Everything train_harness.c.j2 prints."""

    target: str
    cases: tuple[TrainHarnessCase, ...]
    solvers: tuple[TrainHarnessSolver, ...]
    forward_call: str            # forward_train on case c (struct train_case *c)
    backward_call: str           # backward on case c
    api_checks: tuple[ApiCheck, ...]
    max_numel: int
    max_stats: int
    max_modulated: int
    measure_stack: bool          # paint the stack and report each call's depth (bare metal)
    per_line: int = HEX_PER_LINE

    @property
    def any_sum(self) -> bool:
        """True when a case asks forward_train for the skip sum (a second work buffer)."""
        return any(c.want_sum for c in self.cases)


def _case_arrays(tc: TrainCase) -> tuple[tuple[str, np.ndarray], ...]:
    """Return the arrays a training case holds, by argument name (those it has)."""
    c = tc.case
    given = (("x", c.x), ("dy", tc.dy), ("scale", c.scale), ("offset", c.offset),
             ("skip", c.skip), ("ada_scale", c.ada_scale), ("ada_shift", c.ada_shift))
    return tuple((k, v) for k, v in given if v is not None)


def train_harness_for(plan: Plan, board: Board, cases: list[TrainCase],
                      solvers: list[SolverInputs] | None = None) -> TrainHarness:
    """Return the TrainHarness holding a training layer's cases and solver updates."""
    layer = plan.layer
    dt = layer.dtype
    prefix = plan.prefix
    solvers = list(solver_inputs(layer)) if solvers is None else solvers
    # Rounded here: a solver's draws are sums of values of the storage type (the C runner's
    # copies round them too)
    exact = lambda values: tuple(hex_literal(v, dt) for v in dtype(dt).round(values))  # noqa: E731
    hcases = []
    for tc in cases:
        c = tc.case
        assert '"' not in c.name and "\\" not in c.name, c.name
        hcases.append(TrainHarnessCase(
            c.name, c.batch, c.in_place, len(c.x), c.batch * layer.num_groups,
            c.batch * layer.num_channels if layer.adaptive else 0, c.want_sum, c.sizes,
            tuple((k, exact(v)) for k, v in _case_arrays(tc))))
    hsolvers = []
    for i, s in enumerate(solvers):
        state = SOLVER_STATE[s.solver]
        arrays = (("scale", exact(s.scale)), ("offset", exact(s.offset)),
                  *((n, exact(s.state[n])) for n in state),
                  ("dscale", exact(s.dscale)), ("doffset", exact(s.doffset)))
        hsolvers.append(TrainHarnessSolver(s.solver, state, arrays,
                                           _call(prefix, f"{s.solver}_update", solver_args(s),
                                                 _solver_values(i, s, dt))))
    sizes = {r.name: f"c->{r.name}" for r in layer.runtime_sizes}
    fwd = {"x": "x", "y": "work_y", "batch": "c->batch", **sizes, "scale": "c->scale",
           "offset": "c->offset", "skip": "c->skip",
           "sum": "c->want_sum ? work_sum : NULL", "ada_scale": "c->ada_scale",
           "ada_shift": "c->ada_shift", "mean": "work_mean", "rstd": "work_rstd"}
    bwd = {**fwd, "x": "c->x", "dy": "dy", "dx": "work_dx", "dscale": "work_dscale",
           "doffset": "work_doffset", "dada_scale": "work_dada_scale",
           "dada_shift": "work_dada_shift"}
    return TrainHarness(
        board.name, tuple(hcases), tuple(hsolvers),
        _call(prefix, "forward_train", forward_args(layer), fwd),
        _call(prefix, "backward", backward_args(layer), bwd),
        _api_checks(plan, solvers),
        max(c.numel for c in hcases), max(c.stats for c in hcases),
        max(c.modulated for c in hcases), measure_stack=board.measures_stack)


def _solver_values(index: int, s: SolverInputs, dt: str) -> dict[str, str]:
    """Return the C expressions of update `index`'s arguments by name: the harness's solver
    buffers (the parameters and state, copied there), its gradients' constants and its
    hyperparameters as exact literals."""
    buffers = ("scale", "offset", *SOLVER_STATE[s.solver])
    return {**{n: f"solver_work[{k}]" for k, n in enumerate(buffers)},
            "dscale": f"solver{index}_dscale", "doffset": f"solver{index}_doffset",
            **{k: (f"{v}ul" if k == "step" else hex_literal(v, dt)) for k, v in s.hyper.items()}}


def _api_checks(plan: Plan, solvers: list[SolverInputs]) -> tuple[ApiCheck, ...]:
    """Return the refusals checked on case 0 and each solver's inputs: every pointer of every
    training entry point NULL in turn (a skip layer's sum may be NULL), and Adam's step 0."""
    layer = plan.layer
    prefix = plan.prefix
    first = {"x": "train_cases[0].x", "y": "work_y", "batch": "train_cases[0].batch",
             **{r.name: f"train_cases[0].{r.name}" for r in layer.runtime_sizes},
             **{n: f"train_cases[0].{n}" for n in ("scale", "offset", "skip", "ada_scale",
                                                   "ada_shift", "dy")},
             "sum": "NULL", "mean": "work_mean", "rstd": "work_rstd", "dx": "work_dx",
             "dscale": "work_dscale", "doffset": "work_doffset",
             "dada_scale": "work_dada_scale", "dada_shift": "work_dada_shift"}
    sizes = {r.name for r in layer.runtime_sizes}
    checks = []
    for entry, names in (("forward_train", forward_args(layer)),
                         ("backward", backward_args(layer))):
        for name in _pointers(names, {"batch", *sizes}):
            if name not in OPTIONAL_POINTERS:
                checks.append(ApiCheck(_call(prefix, entry, names, {**first, name: "NULL"}),
                                       "ERR_NULL", f"{entry} NULL {name}"))
    for i, s in enumerate(solvers):
        names = solver_args(s)
        values = _solver_values(i, s, layer.dtype)
        entry = f"{s.solver}_update"
        for name in _pointers(names, set(s.hyper)):
            checks.append(ApiCheck(_call(prefix, entry, names, {**values, name: "NULL"}),
                                   "ERR_NULL", f"{entry} NULL {name}"))
        if "step" in names:
            checks.append(ApiCheck(_call(prefix, entry, names, {**values, "step": "0ul"}),
                                   "ERR_STEP", f"{entry} step 0"))
    return tuple(checks)


def render_train_harness(layer: CRecord | Plan, harness: TrainHarness) -> Source:
    """Return the training harness source for one layer."""
    rec = as_record(layer)
    plan = rec.plan
    assert rec.acc.ctype == rec.ctype, "the statistics are printed as the storage type"
    return Source(f"{plan.prefix}_train_harness.c",
                  render_template("firmware/train_harness.c.j2", plan=plan, rec=rec,
                                  harness=harness, generator=f"gncodegen {__version__}"))


# --------------------------------------------------------------------------- sizing


def train_case_bytes(cases: list[TrainCase], layer: Layer) -> tuple[int, int]:
    """Return (bytes of constants, bytes of work buffers) a set of training cases needs, the
    solvers' updates included."""
    size = 8 if layer.dtype == "double" else 4
    channels = layer.num_channels
    const = sum(sum(np.size(v) for _, v in _case_arrays(tc)) for tc in cases) * size
    # each update's parameters, state (4 arrays at most), and gradients
    const += len(SOLVER_STATE) * (2 + 4 + 2) * channels * size
    numel = max(len(tc.case.x) for tc in cases)
    batch = max(tc.case.batch for tc in cases)
    sums = any(tc.case.want_sum for tc in cases)
    work = ((3 if sums else 2) * numel + 2 * batch * layer.num_groups + 2 * channels
            + (2 * batch * channels if layer.adaptive else 0) + 6 * channels) * size
    return const, work


def _fits(board: Board, cases: list[TrainCase], layer: Layer) -> bool:
    const, work = train_case_bytes(cases, layer)
    if not board.bare_metal:
        return const <= HOSTED_CASE_BYTES
    return (const + board.code_room <= board.flash.length
            and work + board.stack_size <= board.ram.length)


@dataclass(frozen=True)
class TrainingCases:
    """The training cases a board's image holds, and the runtime size sets left out."""

    cases: tuple[TrainCase, ...]
    skipped: tuple[tuple[int, ...], ...] = ()


def training_cases(layer: Layer, board: Board, seed: int = 0) -> TrainingCases:
    """Return the training cases for a layer, sized to fit the board's image.

    Batch > 1 where the format has a B dimension (2 observations; 1 when two do not fit). On
    bare metal a layer with runtime sizes whose cases do not all fit leaves out the size sets
    that do not fit beside the others (the largest, in practice), at whichever batch keeps
    the most; only when none fits is it refused.
    """
    best = None
    for max_batch in (2, 1):
        cases = list(train_cases(layer, seed=seed, max_batch=max_batch))
        if _fits(board, cases, layer):
            return TrainingCases(tuple(cases))
        if board.bare_metal and layer.runtime_sizes:
            got = _fitting_sets(board, cases, layer)
            if got.cases and (best is None or len(got.skipped) < len(best.skipped)):
                best = got
    if best is not None:
        return best
    const, work = train_case_bytes(cases, layer)
    if not board.bare_metal:
        raise TargetUnavailable(
            f"{board.name}: the training test vectors of layer '{layer.name}' take "
            f"{const // MiB} MiB, more than the {HOSTED_CASE_BYTES // MiB} MiB a harness "
            "compiles in as literals in reasonable time (the c target verifies training of a "
            "layer of any size)")
    if layer.runtime_sizes:   # what the smallest set alone needs, at batch 1
        smallest = cases[0].case.sizes
        const, work = train_case_bytes([tc for tc in cases if tc.case.sizes == smallest], layer)
    raise TargetUnavailable(
        f"{board.name}: the training test vectors of layer '{layer.name}' need "
        f"{const // KiB} KiB of constants and {work // KiB} KiB of RAM"
        f"{' at its smallest runtime sizes' if layer.runtime_sizes else ''}, more than the "
        f"{board.machine} image holds ({board.flash.length // KiB} KiB / "
        f"{board.ram.length // KiB} KiB)")


def _fitting_sets(board: Board, cases: list[TrainCase], layer: Layer) -> TrainingCases:
    """Return the cases of the runtime size sets that fit together, taken in order (the
    smallest first), and the sets left out."""
    kept: list[TrainCase] = []
    skipped = []
    for sizes in dict.fromkeys(tc.case.sizes for tc in cases):
        trial = kept + [tc for tc in cases if tc.case.sizes == sizes]
        if _fits(board, trial, layer):
            kept = trial
        else:
            skipped.append(sizes)
    return TrainingCases(tuple(kept), tuple(skipped))


# --------------------------------------------------------------------------- the printout


@dataclass(frozen=True)
class TrainPrintout:
    """What a training image printed: each case's outputs, each solver's updated arrays, and
    the deepest stack each entry point used (bare metal; empty elsewhere)."""

    cases: dict[str, TrainOutputs]
    solvers: dict[str, dict[str, np.ndarray]]
    stack: dict[str, int]


_TCASE = re.compile(r"case (\d+) (.*) forward rc (-?\d+) backward rc (-?\d+)"
                    r"(?: stack (\d+) (\d+))?\Z")
_SOLVER = re.compile(r"solver (\d+) (\w+) rc (-?\d+)(?: stack (\d+))?\Z")
_BLOCK = re.compile(r"(\w+) (\d+)\Z")


class _Reader:
    """The printout's lines, read in order; anything unexpected raises VerificationError."""

    def __init__(self, text: str, plan: Plan):
        self.lines = text.splitlines()
        self.i = 0
        self.prefix = plan.prefix
        self.bits = np.dtype("<u8" if plan.dtype.bytes == 8 else "<u4")
        self.float_type = np.float64 if plan.dtype.bytes == 8 else np.float32
        digits = 2 * plan.dtype.bytes
        self.hex_line = re.compile(rf"[0-9a-f]{{{digits}}}( [0-9a-f]{{{digits}}})*")

    def fail(self, what: str):
        got = self.lines[self.i] if self.i < len(self.lines) else "end of output"
        raise VerificationError(f"{self.prefix}: the training harness printed {got!r} "
                                f"where {what} was expected")

    def line(self, pattern: re.Pattern, what: str) -> re.Match:
        m = pattern.fullmatch(self.lines[self.i]) if self.i < len(self.lines) else None
        if not m:
            self.fail(what)
        self.i += 1
        return m

    def block(self, name: str, count: int, where: str) -> np.ndarray:
        """Read `<name> <count>` and its hex lines: the values as float64."""
        m = self.line(_BLOCK, f"{name} of {where}")
        if m.group(1) != name or int(m.group(2)) != count:
            self.i -= 1
            self.fail(f"'{name} {count}' ({where})")
        rows = math.ceil(count / HEX_PER_LINE)
        chunk = self.lines[self.i:self.i + rows]
        if len(chunk) != rows or not all(self.hex_line.fullmatch(r) for r in chunk):
            raise VerificationError(f"{self.prefix}: {name} of {where} is not {count} hex "
                                    f"values of {self.bits.itemsize} bytes")
        words = " ".join(chunk).split()
        if len(words) != count:
            raise VerificationError(f"{self.prefix}: {name} of {where} printed {len(words)} "
                                    f"values, expected {count}")
        self.i += rows
        bits = np.array([int(w, 16) for w in words], dtype=self.bits)
        return bits.view(self.float_type).astype(np.float64)


def parse_train_output(text: str, plan: Plan, cases: list[TrainCase],
                       solvers: list[SolverInputs]) -> TrainPrintout:
    """Return a training harness's printout as TrainPrintout; raise VerificationError on
    anything odd (a missing or extra value, a return code other than 0, a failed refusal)."""
    layer = plan.layer
    read = _Reader(text, plan)
    header = f"train {plan.prefix} {len(cases)} {len(solvers)}"
    try:
        read.i = read.lines.index(header) + 1
    except ValueError:
        raise VerificationError(f"{plan.prefix}: the training harness printed no header "
                                f"({header!r})") from None
    outputs: dict[str, TrainOutputs] = {}
    depth: dict[str, int] = {}

    def deepest(entry: str, value: str | None) -> None:
        if value is not None:
            depth[entry] = max(depth.get(entry, 0), int(value))

    channels = layer.num_channels
    for index, tc in enumerate(cases):
        case = tc.case
        m = read.line(_TCASE, f"case {index} ({case.name})")
        if int(m.group(1)) != index or m.group(2) != case.name:
            read.i -= 1
            read.fail(f"case {index} ({case.name})")
        for entry, rc in (("forward_train", m.group(3)), ("backward", m.group(4))):
            if int(rc) != 0:
                raise VerificationError(f"{plan.prefix}: {entry} returned {rc} on training "
                                        f"case '{case.name}'")
        deepest("forward_train", m.group(5))
        deepest("backward", m.group(6))
        numel, stats = len(case.x), case.batch * layer.num_groups
        where = f"case '{case.name}'"
        y = read.block("y", numel, where)
        total = read.block("sum", numel, where) if case.want_sum else None
        mean, rstd = read.block("mean", stats, where), read.block("rstd", stats, where)
        dx = read.block("dx", numel, where)
        dscale = read.block("dscale", channels, where)
        doffset = read.block("doffset", channels, where)
        dada = ((read.block("dada_scale", case.batch * channels, where),
                 read.block("dada_shift", case.batch * channels, where))
                if layer.adaptive else (None, None))
        outputs[case.name] = TrainOutputs(y, mean, rstd, dx, dscale, doffset, *dada, sum=total)
    updated: dict[str, dict[str, np.ndarray]] = {}
    for index, s in enumerate(solvers):
        m = read.line(_SOLVER, f"solver {index} ({s.solver})")
        if int(m.group(1)) != index or m.group(2) != s.solver:
            read.i -= 1
            read.fail(f"solver {index} ({s.solver})")
        if int(m.group(3)) != 0:
            raise VerificationError(f"{plan.prefix}: {s.solver}_update returned {m.group(3)}")
        deepest(f"{s.solver}_update", m.group(4))
        updated[s.solver] = {n: read.block(n, channels, f"{s.solver}_update")
                             for n in ("scale", "offset", *SOLVER_STATE[s.solver])}
    if read.i >= len(read.lines) or read.lines[read.i] != "api ok":
        fails = [ln for ln in read.lines[read.i:] if ln.startswith("api FAIL")]
        rest = read.lines[read.i] if read.i < len(read.lines) else "no output"
        raise VerificationError(f"{plan.prefix}: the training API checks failed on the "
                                f"target: {'; '.join(fails) or rest}")
    return TrainPrintout(outputs, updated, depth)
