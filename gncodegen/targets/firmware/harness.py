"""The test image's harness: the verification cases as exact C literals, and its printout read
back. The harness calls the layer's entry points on every case and prints each output's bit
pattern (and, on bare metal, the stack each call used)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from ... import __version__
from ...errors import TargetUnavailable, VerificationError
from ...plan import Plan
from ...render import Source, render_template
from ...spec import Layer
from ...verify import Case, make_cases
from ..c.record import CRecord, as_record
from .boards import KiB, MiB, Board

HEX_PER_LINE = 8
# The most test-vector bytes a Linux program's harness holds as C literals (about 8 MB of source
# a MiB): more would take the cross compiler minutes and gigabytes.
HOSTED_CASE_BYTES = 32 * MiB


@dataclass(frozen=True)
class HarnessCase:
    """One case as the harness holds it: its inputs as exact C literals."""

    name: str
    batch: int
    in_place: bool
    numel: int
    x_literals: tuple[str, ...]
    scale_literals: tuple[str, ...] = ()
    offset_literals: tuple[str, ...] = ()
    sizes: tuple[int, ...] = ()      # the runtime sizes of the call
    skip_literals: tuple[str, ...] = ()       # a skip layer's second input
    want_sum: bool = False                    # ... and whether the call asks for the sum
    ada_scale_literals: tuple[str, ...] = ()  # an adaptive layer's modulation
    ada_shift_literals: tuple[str, ...] = ()


@dataclass(frozen=True)
class Harness:
    """Everything harness.c.j2 prints."""

    target: str
    cases: tuple[HarnessCase, ...]
    max_numel: int
    measure_stack: bool          # paint the stack and report each call's depth (bare metal)
    count: bool = False          # count one more call of case count_case with the counter
    count_case: int = 0          # the largest batch-1 case (at the largest runtime sizes)
    per_line: int = HEX_PER_LINE


def hex_literal(value: float, dtype: str) -> str:
    """Return a C99 hexadecimal literal that is exactly value (already rounded to dtype).

    NaN and infinities have no literal: they are <math.h>'s NAN and INFINITY (float constant
    expressions, converted explicitly for double).
    """
    value = float(value)
    if not np.isfinite(value):
        name = "NAN" if np.isnan(value) else ("-INFINITY" if value < 0 else "INFINITY")
        return f"(double){name}" if dtype == "double" else name
    text = value.hex()
    mant, exp = text.split("p")
    if "." in mant:
        mant = mant.rstrip("0").rstrip(".")
    return f"{mant}p{exp}" + ("" if dtype == "double" else "f")


def harness_for(plan: Plan, board: Board, cases: list[Case]) -> Harness:
    """Return the Harness holding a layer's cases for a target."""
    dt = plan.layer.dtype
    hcases = []
    for case in cases:
        assert '"' not in case.name and "\\" not in case.name, case.name
        lits = tuple(hex_literal(v, dt) for v in case.x)
        params = ((), ())
        if case.scale is not None:
            params = (tuple(hex_literal(v, dt) for v in case.scale),
                      tuple(hex_literal(v, dt) for v in case.offset))
        exact = lambda values: tuple(hex_literal(v, dt) for v in values)   # noqa: E731
        fusion = {}
        if case.skip is not None:
            fusion.update(skip_literals=exact(case.skip), want_sum=case.want_sum)
        if case.ada_scale is not None:
            fusion.update(ada_scale_literals=exact(case.ada_scale),
                          ada_shift_literals=exact(case.ada_shift))
        hcases.append(HarnessCase(case.name, case.batch, case.in_place, len(case.x), lits,
                                  *params, sizes=case.sizes, **fusion))
    return Harness(board.name, tuple(hcases), max(c.numel for c in hcases),
                   measure_stack=board.measures_stack, count=board.counts_instructions,
                   count_case=counted_case(cases))


def counted_case(cases: list[Case]) -> int:
    """Return the index of the case whose call is counted: the largest of batch 1 (the first
    such: fixed sizes have one)."""
    ones = [i for i, c in enumerate(cases) if c.batch == 1 and not c.in_place]
    return max(ones, key=lambda i: (len(cases[i].x), -i)) if ones else 0


def render_harness(layer: CRecord | Plan, harness: Harness) -> Source:
    """Return the harness source for one layer."""
    rec = as_record(layer)
    plan = rec.plan
    return Source(f"{plan.prefix}_harness.c",
                  render_template("firmware/harness.c.j2", plan=plan, rec=rec, harness=harness,
                                  generator=f"gncodegen {__version__}"))


def case_bytes(cases: list[Case], dtype: str) -> tuple[int, int]:
    """Return (bytes of constants, bytes of the work buffer) a set of cases needs."""
    size = 8 if dtype == "double" else 4
    const = sum((len(c.x) + (0 if c.scale is None else 2 * len(c.scale))
                 + (0 if c.skip is None else len(c.skip))
                 + (0 if c.ada_scale is None else 2 * len(c.ada_scale))) * size
                for c in cases)
    sums = any(c.want_sum for c in cases)   # a second work buffer takes the sum
    return const, (2 if sums else 1) * max(len(c.x) for c in cases) * size


def firmware_cases(layer: Layer, board: Board, seed: int = 0) -> list[Case]:
    """Return the verification cases for a layer, sized to fit the target's board.

    Batch > 1 where the format has a B dimension (2 observations; 1 when two do not fit).
    """
    for max_batch in (2, 1):
        cases = make_cases(layer, seed=seed, max_batch=max_batch)
        const, work = case_bytes(cases, layer.dtype)
        if not board.bare_metal:
            if const <= HOSTED_CASE_BYTES:
                return cases
            continue
        if (const + board.code_room <= board.flash.length
                and work + board.stack_size <= board.ram.length):
            return cases
    if not board.bare_metal:
        raise TargetUnavailable(
            f"{board.name}: the test vectors of layer '{layer.name}' take {const // MiB} MiB, "
            f"more than the {HOSTED_CASE_BYTES // MiB} MiB a harness compiles in as literals "
            "in reasonable time (the c target verifies a layer of any size)")
    raise TargetUnavailable(
        f"{board.name}: the test vectors of layer '{layer.name}' need {const // KiB} KiB of "
        f"constants and {work // KiB} KiB of RAM, more than the {board.machine} image holds "
        f"({board.flash.length // KiB} KiB / {board.ram.length // KiB} KiB)")


_CASE = re.compile(r"case (\d+) (.*) rc (-?\d+) numel (\d+)(?: stack (\d+))?\Z")
_COUNT = re.compile(r"count (\d+)\Z")


def measured_stack(text: str) -> int | None:
    """Return the deepest stack a harness measured over its cases (None if it measured none)."""
    depths = [int(m.group(5)) for line in text.splitlines()
              if (m := _CASE.match(line)) and m.group(5) is not None]
    return max(depths, default=None)


def measured_instructions(text: str, board: Board, cases: list[Case]) -> int | None:
    """Return the instructions one observation took: the count over one more call of the
    counted case (batch 1, the largest runtime sizes) turned into instructions, or None where
    the image did not count."""
    if not board.counts_instructions or not cases or cases[counted_case(cases)].batch != 1:
        return None
    counts = [int(m.group(1)) for line in text.splitlines() if (m := _COUNT.match(line))]
    return board.instructions(counts[-1]) if counts else None


def parse_output(text: str, plan: Plan, cases: list[Case]
                 ) -> dict[str, np.ndarray | tuple[np.ndarray, np.ndarray]]:
    """Return case name -> outputs (float64) from a harness's printout, (y, sum) for a case
    that asks for a skip layer's sum; raise on anything odd."""
    dtype = np.dtype("<u8" if plan.dtype.bytes == 8 else "<u4")
    float_type = np.float64 if plan.dtype.bytes == 8 else np.float32
    digits = 2 * plan.dtype.bytes
    hex_line = re.compile(rf"[0-9a-f]{{{digits}}}( [0-9a-f]{{{digits}}})*")
    lines = text.splitlines()
    try:
        start = lines.index(f"harness {plan.prefix} {len(cases)}")
    except ValueError:
        raise VerificationError(f"{plan.prefix}: the harness printed no header") from None
    i = start + 1
    outputs: dict[str, np.ndarray] = {}
    for index, case in enumerate(cases):
        m = _CASE.match(lines[i]) if i < len(lines) else None
        if not m or int(m.group(1)) != index or m.group(2) != case.name:
            raise VerificationError(f"{plan.prefix}: expected case {index} ({case.name}), "
                                    f"got {lines[i] if i < len(lines) else 'end of output'!r}")
        rc, numel = int(m.group(3)), int(m.group(4))
        if rc != 0:
            raise VerificationError(f"{plan.prefix}: case '{case.name}' returned {rc}")
        blocks = []
        for _ in range(2 if case.want_sum else 1):   # y, then the sum
            rows = 0
            while (rows < math.ceil(numel / HEX_PER_LINE) and i + 1 + rows < len(lines)
                   and hex_line.fullmatch(lines[i + 1 + rows])):
                rows += 1
            words = " ".join(lines[i + 1:i + 1 + rows]).split()
            if len(words) != numel:
                raise VerificationError(f"{plan.prefix}: case '{case.name}' printed "
                                        f"{len(words)} values, expected {numel}")
            bits = np.array([int(w, 16) for w in words], dtype=dtype)
            blocks.append(bits.view(float_type).astype(np.float64))
            i += rows
        outputs[case.name] = blocks[0] if len(blocks) == 1 else (blocks[0], blocks[1])
        i += 1
    if i >= len(lines) or lines[i] != "api ok":
        raise VerificationError(f"{plan.prefix}: the API checks failed on the target: "
                                f"{lines[i] if i < len(lines) else 'no output'}")
    return outputs
