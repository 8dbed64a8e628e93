"""Firmware targets: the generated C built for Cortex-M and AArch64 Linux and proven under QEMU.

Each target is a board (boards.py): the cross compiler, the CPU flags, the QEMU machine and its
memory map. Verifying a layer on one builds a test image from the generated `<name>.c/.h`, a
harness whose seeded inputs are the verification cases (harness.py), start-up code and a linker
script rendered for the board (qemu.py); QEMU runs it with semihosting, the harness prints every
output's bit pattern, and the outputs are compared with the float64 reference.

Besides running, this target checks what firmware engineers ask of the code: it compiles without
a warning under the strict flags on every compiler (strict.py), makes no double-precision or
heap calls, holds no mutable state and does not recurse; and it measures the footprint
(sections and worst stack depth) on a Cortex-M at -Os (footprint.py).

A training layer (`training: true`) also runs a second image whose harness holds its training
cases and solver updates (train_harness.py): forward_train, backward and the three updates
are compared with the float64 reference of gncodegen.training, their refusals are checked on
the core, and the footprint lists the training entry points apart from the prediction kernel,
whose budgets stay its own.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, replace
from pathlib import Path

from ...errors import SpecError, TargetUnavailable, VerificationError
from ...fields import parse_int
from ...options import SpecOption
from ...plan import Plan
from ...render import Source
from ...spec import Spec
from ...verify import Case, CaseResult, Report, size_label, verify_layer
from ...verify_train import solver_inputs, verify_training
from ..base import CliOption, Outcome, RunOptions, Target
from ..c import CTarget, spec_file_name
from ..c.record import CRecord, as_record
from .boards import BOARDS, STACK_BUDGET, TEXT_BUDGET, Board, require_tool
from .footprint import (ALLOWED_CALLS, TRAINING_ENTRIES, EntryFootprint, Footprint,
                        FootprintRow, activation_calls, check_object_calls, footprint_flags,
                        footprint_table, measure_footprint, training_calls)
from .harness import (firmware_cases, harness_for, hex_literal, measured_instructions,
                      measured_stack, parse_output, render_harness)
from .project import project_for, render_project
from .train_harness import (TrainingCases, TrainPrintout, parse_train_output,
                            render_train_harness, train_harness_for, training_cases)
from ...progress import say
from .qemu import build_image, render_linker_script, run_image, support_sources
from .strict import STRICT_CONFIGS, STRICT_OPTS, check_strict


CFLAGS = CliOption(
    "cflags", (), "",
    "Firmware targets: also verify the generated code compiled with exactly these flags "
    "(after the core's CPU flags), e.g. \"-O2 -ffunction-sections\".")


def parse_cflags(text: str) -> tuple[str, ...]:
    """Return a --cflags value as arguments, or raise SpecError naming the option."""
    try:
        args = tuple(shlex.split(text))
    except ValueError as exc:
        raise SpecError("--cflags", f"cannot be split into arguments ({exc})") from None
    for arg in args:
        if not arg.startswith("-") or arg in ("-o", "-c", "-E", "-S") or arg.startswith("-o"):
            raise SpecError("--cflags", f"'{arg}' is not a compile flag (the build names the "
                                        "files, the output and the stage itself)")
    return args


def parse_budget(value, fld: str) -> int:
    """Return a footprint budget a spec sets, in bytes (0 for "auto": the core's own)."""
    if value == "auto":
        return 0
    return parse_int(value, fld, minimum=1, maximum=1 << 24)


# Sizes given at run time cost text of their own: checking them, the strides from them, and
# compensated sums whatever the group's length (about 70 bytes on the Cortex-M4 at -Os).
RUNTIME_TEXT_BUDGET = 512
# What a fused activation may add on the Cortex-M4 at -Os (text, stack), measured on the
# MATLAB example: a comparison or two (relu +12 B, clipped-relu +44 B, +8 B of stack), or the
# source's own e^x (and erf) with the activation around it (elu +228 B, gelu +356 B of text,
# +48 to +56 B of stack; no call of the math library).
ACTIVATION_ALLOWANCE = {"piecewise": (48, 16), "exponential": (384, 64)}
# ... and a skip or a modulation, measured alike on three layouts (SSCB, CBT, channels-last
# BSSC): the sweep that adds skip into t (+84 to +96 B of text, +8 to +16 B of stack), the
# gain and shift per element (+72 to +80 B, +24 B); both together +164 to +192 B, +32 to +48 B.
FUSION_ALLOWANCE = {"skip": (112, 16), "adaptive": (96, 32)}


def budgets(layer) -> tuple[int, int]:
    """Return the (text, stack) budget of a layer: the spec's, else the core's own for its
    sizes and fused activation."""
    text = TEXT_BUDGET_OPTION.value(layer)
    stack = STACK_BUDGET_OPTION.value(layer)
    extra = (0, 0)
    if layer.activation.fused:
        extra = ACTIVATION_ALLOWANCE["exponential" if layer.activation.libm else "piecewise"]
    for key in ("skip", "adaptive"):
        if getattr(layer, key):
            extra = (extra[0] + FUSION_ALLOWANCE[key][0], extra[1] + FUSION_ALLOWANCE[key][1])
    base = RUNTIME_TEXT_BUDGET if layer.runtime_sizes else TEXT_BUDGET
    return text or base + extra[0], stack or STACK_BUDGET + extra[1]

TEXT_BUDGET_OPTION = SpecOption(
    "text_budget", ("TextBudget",), "auto", parse_budget,
    f"bytes of kernel text a single-precision layer may take on the Cortex-M4 at -Os "
    f"(auto: {TEXT_BUDGET}, {RUNTIME_TEXT_BUDGET} with runtime sizes, more with a fused "
    f"activation, skip or modulation)")
STACK_BUDGET_OPTION = SpecOption(
    "stack_budget", ("StackBudget",), "auto", parse_budget,
    f"bytes of stack a single-precision layer may use on the Cortex-M4 at -Os (auto: "
    f"{STACK_BUDGET}, more with a fused activation, skip or modulation)")


@dataclass(frozen=True)
class LayerRun:
    """What verifying one layer on one firmware target produced."""

    report: Report
    footprint: Footprint | None
    image: Path | None
    measured_stack: int | None = None   # deepest stack a kernel call used in the image
    instructions: int | None = None     # instructions one observation ran in the image
    training_image: Path | None = None  # a training layer's second image
    training_skipped: tuple[tuple[int, ...], ...] = ()   # runtime size sets it left out


def verify_layer_on(board: Board, layer: CRecord | Plan, layer_sources: list[Source],
                    keep: bool = False, cases: list[Case] | None = None,
                    corrupt=None, opt: str | None = None,
                    cflags: tuple[str, ...] | None = None,
                    corrupt_training=None) -> LayerRun:
    """Return the verification of one layer on a firmware board, built at opt (the board's
    own level unless given) or, with cflags, with exactly a user's flags. A training layer
    also runs its training image, whose cases join the report ("train: ...").

    corrupt, when given, edits the parsed outputs before the comparison (tests use it to see
    a wrong value fail); corrupt_training likewise edits a training image's TrainPrintout.
    """
    rec = as_record(layer)
    plan = rec.plan
    layer = plan.layer
    opt = opt or board.opt
    cases = cases if cases is not None else firmware_cases(layer, board)   # fits, before work
    trained = training_cases(layer, board) if layer.training else None
    if cflags is None:
        for config in STRICT_CONFIGS:
            if config.label == board.name or (board.name == "aarch64-linux"
                                               and config.label == "aarch64"):
                check_strict(layer_sources, config, opt)
    if not board.runner:
        raise TargetUnavailable(f"{board.name}: no emulator to run on")
    image = build_image(board, plan, layer_sources,
                        render_harness(rec, harness_for(plan, board, cases)), keep, opt, cflags)
    printout = run_image(image)
    outputs = parse_output(printout, plan, cases)
    if corrupt is not None:
        outputs = corrupt(outputs)
    label = opt if cflags is None else "--cflags"
    report = verify_layer(layer, board.name, f"{board.runner_name} {label}",
                          lambda case: outputs[case.name], cases)
    report = replace(report, build=(("compiler", image.compiler),
                                    ("flags", " ".join(image.layer_flags))))
    training = None
    if trained is not None:
        training = _run_training(board, rec, layer_sources, trained, keep, opt, cflags,
                                 corrupt_training)
        report = replace(report, cases=report.cases + training.results)
    footprint = None
    if board.cc:
        # Every core measures its own footprint at -Os (a Linux program's stack is not
        # measured in the image: its harness runs under an operating system).
        header, source = _layer_pair(plan, layer_sources)
        footprint = measure_footprint(plan, source, header, board)
        if board.bare_metal and cflags is None and opt == footprint.opt:
            # The image ran the very code measured: add what its calls really used and ran.
            footprint = replace(footprint, stack_measured=measured_stack(printout),
                                instructions=measured_instructions(printout, board, cases))
            if training is not None:
                footprint = footprint.with_training_measured(training.printout.stack)
        fused = activation_calls(layer.activation, layer.dtype)
        trains = training_calls(layer)
        bad = check_object_calls(footprint, layer.dtype, board.soft_float, fused, trains)
        if bad:
            extra = ", ".join(sorted(trains - ALLOWED_CALLS[layer.dtype] - fused))
            raise VerificationError(
                f"{plan.prefix}: the {board.name} object calls {', '.join(bad)}; "
                f"{layer.dtype} precision may call only "
                f"{', '.join(sorted(ALLOWED_CALLS[layer.dtype] | fused))}"
                f"{' and the float helpers' if board.soft_float else ''}"
                + (f" (its training entry points also {extra})" if extra else ""))
    return LayerRun(report, footprint, image.path, measured_stack(printout),
                    measured_instructions(printout, board, cases),
                    training_image=None if training is None else training.image,
                    training_skipped=() if trained is None else trained.skipped)


@dataclass(frozen=True)
class TrainingRun:
    """What a training layer's training image gave on a board."""

    printout: TrainPrintout
    results: tuple[CaseResult, ...]     # "train: ..." against the reference
    image: Path


def _run_training(board: Board, rec: CRecord, layer_sources: list[Source],
                  trained: TrainingCases, keep: bool, opt: str,
                  cflags: tuple[str, ...] | None, corrupt=None) -> TrainingRun:
    """Return the run of a training layer's training image on a board: built as the
    prediction image is, run, read back and compared with the reference."""
    plan = rec.plan
    cases = list(trained.cases)
    solvers = list(solver_inputs(plan.layer))
    harness = render_train_harness(rec, train_harness_for(plan, board, cases, solvers))
    image = build_image(board, plan, layer_sources, harness, keep, opt, cflags)
    # its printout names what failed (an exit status of 1 alone would not)
    printout = parse_train_output(run_image(image, verdict=True), plan, cases, solvers)
    if corrupt is not None:
        printout = corrupt(printout)
    results = verify_training(plan.layer, lambda tc: printout.cases[tc.name],
                              lambda s: printout.solvers[s.solver], cases)
    return TrainingRun(printout, results, image.path)


def bound_numel(plan: Plan) -> int | None:
    """Return the elements of the largest observation: every runtime size at its bound (None
    when one has no bound)."""
    if not plan.runtime_sizes:
        return plan.observation_numel
    if any(r.max is None for r in plan.runtime_sizes):
        return None
    return plan.layer.at_sizes(tuple(r.max for r in plan.runtime_sizes)).observation_numel


def _layer_pair(plan: Plan, sources: list[Source]) -> tuple[Source, Source]:
    by_name = {s.name: s for s in sources}
    return by_name[f"{plan.prefix}.h"], by_name[f"{plan.prefix}.c"]


class FirmwareTarget(CTarget):
    """The C target's sources, verified on one board under QEMU."""

    def __init__(self, board: Board):
        self.board = board
        self.name = board.name
        self.description = board.description

    cli_options = (CFLAGS,)
    spec_options = (TEXT_BUDGET_OPTION, STACK_BUDGET_OPTION)

    def render(self, spec: Spec, records: tuple[CRecord, ...]) -> list[Source]:
        """The layers' C, and the minimal project that runs them on this core (project.py)."""
        return [*super().render(spec, records),
                *render_project(project_for(self.board, records, spec_file_name(spec)))]

    def verify(self, spec: Spec, records: tuple[CRecord, ...], sources: list[Source],
               options: RunOptions) -> Outcome:
        reports, rows, failures, manifest, skipped = [], [], [], {}, []
        cflags = parse_cflags(options.get(CFLAGS))
        for rec in records:
            plan = rec.plan
            layer_sources = list(_layer_pair(plan, sources))
            fp = None
            for opt in self.board.verified_opts:
                say(f"{self.board.name}: {plan.prefix} at {opt} under {self.board.runner_name}")
                run = verify_layer_on(self.board, rec, layer_sources, keep=options.keep, opt=opt)
                reports.append(run.report)
                if run.training_skipped and opt == self.board.opt:
                    left = "; ".join(size_label(plan.layer, s) for s in run.training_skipped)
                    skipped.append(
                        f"{plan.prefix} on {self.board.name}: training verified without the "
                        f"runtime sizes {left} (their test vectors do not fit the "
                        f"{self.board.machine} image; the c target verifies them)")
                if run.footprint is not None and (fp is None or run.footprint.stack_measured
                                                  or run.footprint.instructions):
                    fp = run.footprint     # the one the -Os image also measured, where it ran
            if cflags:
                run = verify_layer_on(self.board, rec, layer_sources, keep=options.keep,
                                      cflags=cflags)
                reports.append(run.report)
            assert fp is not None
            dtype = plan.layer.dtype
            budget = (budgets(plan.layer)
                      if fp.budget_applies(dtype) else None)
            bound = bound_numel(plan)
            buffers = None if bound is None else 2 * bound * plan.dtype.bytes
            rows.append(FootprintRow(fp, buffers, budget))
            manifest[plan.prefix] = {
                **fp.as_dict(), "flags": " ".join(footprint_flags(self.board, fp.opt)),
                "buffer_bytes_per_observation": buffers,
                **({} if budget is None else {"budget": {"text": budget[0],
                                                         "stack": budget[1]}})}
            for problem in fp.over_budget(dtype, *(budget or (TEXT_BUDGET, STACK_BUDGET))):
                failures.append(f"{fp.layer} on {fp.cpu} {fp.opt}: {problem}"
                                + (" (a spec may raise text_budget and stack_budget)"
                                   if budget else ""))
        flags = " ".join(footprint_flags(self.board))
        notes = (*footprint_table(rows), f"footprint measured with: {self.board.cc} {flags}",
                 *skipped)
        return Outcome(tuple(reports), {"footprint": manifest}, notes, tuple(failures))


TARGETS = tuple(FirmwareTarget(board) for board in BOARDS.values())
