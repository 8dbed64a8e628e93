"""Firmware targets and training layers: forward_train, backward and the solvers' updates run
on emulated cores under QEMU (a second image beside the prediction one) and compared with the
float64 reference of gncodegen.training; their refusals checked on the core; the footprint
lists the training entry points apart from the prediction kernel, whose budget stays its own.

Nothing here is skipped: a missing toolchain fails with the package to install
(scripts/install-toolchains.sh brings them all; test_firmware.py checks each tool).
"""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import replace

import numpy as np
import pytest
from click.testing import CliRunner

from gncodegen.build import run_compiler, write_sources
from gncodegen.cli import main
from gncodegen.errors import TargetUnavailable, VerificationError
from gncodegen.plan import lower
from gncodegen.render import Source
from gncodegen.targets import firmware as fw
from gncodegen.targets.c import render_c
from gncodegen.targets.firmware.qemu import Image
from gncodegen.targets.firmware.train_harness import parse_train_output, training_cases
from gncodegen.verify import verification_sizes
from gncodegen.verify_train import SOLVERS, TRAIN_CASES, solver_inputs

from conftest import make_layer

# Small training layers, so that images stay quick: a plain one, one with a runtime size and
# a bounded one, everything fused at once (with a runtime size), and double precision.
LAYERS = {
    "plain": dict(name="fw_tr", num_groups=4, format="SSCB", input_size=[5, 3, 8],
                  training=True, scale_initializer="narrow-normal",
                  offset_initializer="narrow-normal"),
    "runtime": dict(name="fw_trrt", num_groups=2, format="SCB", input_size=[None, 4],
                    training=True),
    "fused": dict(name="fw_trfu", num_groups=2, format="SSCB", input_size=[{"max": 3}, 3, 4],
                  training=True, skip=True, adaptive=True, activation="swish"),
    "double": dict(name="fw_trf64", num_groups=2, format="CBT", input_size=[6, 3],
                   training=True, dtype="double", epsilon=1e-6),
}
# Where each runs: the Cortex-M4 (the footprint's core) and the Cortex-M0 (no FPU, 16 KiB of
# RAM) for single precision, AArch64 Linux for double.
RUNS = [("cortex-m4", "plain"), ("cortex-m0", "plain"), ("cortex-m4", "runtime"),
        ("cortex-m4", "fused"), ("cortex-m0", "fused"), ("aarch64-linux", "double")]


def _plan(key: str):
    return lower(make_layer(**LAYERS[key]))


def _sources(plan):
    return list(render_c(plan, "test.yaml"))


_runs: dict[tuple[str, str], fw.LayerRun] = {}


def _run(target: str, key: str) -> fw.LayerRun:
    """Return the (memoized) verification of one training layer on one target."""
    if (target, key) not in _runs:
        plan = _plan(key)
        _runs[target, key] = fw.verify_layer_on(fw.BOARDS[target], plan, _sources(plan))
    return _runs[target, key]


# --------------------------------------------------------------------------- runs under QEMU


@pytest.mark.parametrize("target, key", RUNS)
def test_training_matches_reference_on_target(target, key):
    run = _run(target, key)
    failed = [(c.case, c.max_rel, c.nan_mismatch) for c in run.report.cases if not c.passed]
    assert run.report.passed, f"{target}/{key}: {failed}"
    plan = _plan(key)
    layer = plan.layer
    names = [c.case for c in run.report.cases]
    # The prediction cases, then every training case's outputs and every solver's arrays.
    assert "random, batch 1" in names[0]
    train = [n for n in names if n.startswith("train: ")]
    assert train and names[-len(train):] == train
    outputs = ("y", "mean", "rstd", "dx", "dscale", "doffset",
               *(("dada_scale", "dada_shift") if layer.adaptive else ()))
    cases = training_cases(layer, fw.BOARDS[target])
    assert cases.skipped == ()
    for tc in cases.cases:
        assert tc.case.name.startswith(TRAIN_CASES)
        for out in outputs:
            assert f"train: {tc.case.name}: {out}" in train, (tc.case.name, out)
    assert any(tc.case.in_place for tc in cases.cases)
    if layer.has_batch:
        assert max(tc.case.batch for tc in cases.cases) == 2
    if layer.runtime_sizes:
        # every runtime size set the host verifies: 1, odd, the bound (or above it)
        assert {tc.case.sizes for tc in cases.cases} == set(verification_sizes(layer))
    for solver in SOLVERS:
        assert f"train: {solver}_update: scale" in train
    assert "train: adam_update: offset_v" in train
    assert run.training_image is not None and run.training_image.is_file()


def test_a_corrupted_training_output_fails():
    """One saved rstd of one case a part in 10^4 off (10x the single-precision tolerance), or
    one solver's updated value, fails that comparison and nothing else."""
    plan = _plan("plain")
    name = "random, in place"

    def corrupt(printout):
        out = printout.cases[name]
        rstd = out.rstd.copy()
        rstd[1] *= 1 + 1e-4
        adam = dict(printout.solvers["adam"])
        adam["scale_m"] = adam["scale_m"] + np.eye(1, adam["scale_m"].size, 3)[0] * 1e-3
        return replace(printout, cases={**printout.cases, name: replace(out, rstd=rstd)},
                       solvers={**printout.solvers, "adam": adam})

    run = fw.verify_layer_on(fw.BOARDS["cortex-m4"], plan, _sources(plan),
                             corrupt_training=corrupt)
    failed = sorted(c.case for c in run.report.cases if not c.passed)
    assert failed == ["train: adam_update: scale_m", f"train: {name}: rstd"]


def _wrapped(plan, source: Source, entry: str, body: str) -> Source:
    """Return source with `entry` renamed <entry>_real and redefined as body (C text)."""
    include = f'#include "{plan.prefix}.h"\n'
    assert include in source.text
    text = source.text.replace(include, f"{include}#define {entry} {entry}_real\n", 1)
    return Source(source.name, f"{text}\n#undef {entry}\n{body}\n")


def test_refusals_are_checked_on_the_core():
    """An update that takes step 0, one that takes a NULL state and one that writes before it
    refuses each fail the training image's API checks, by name."""
    plan = _plan("plain")
    header, source = _sources(plan)
    p = plan.prefix
    t = "float"
    adam = (f"int {p}_adam_update({t} *scale, {t} *offset, {t} *scale_m, {t} *offset_m, "
            f"{t} *scale_v, {t} *offset_v, const {t} *dscale, const {t} *doffset, "
            f"unsigned long step, {t} learn_rate, {t} beta1, {t} beta2, {t} epsilon, "
            f"{t} l2_regularization)\n{{\n"
            f"    return {p}_adam_update_real(scale, offset, scale_m, offset_m, scale_v, "
            "offset_v, dscale, doffset, step == 0u ? 1u : step, learn_rate, beta1, beta2, "
            "epsilon, l2_regularization);\n}")
    sgdm = (f"int {p}_sgdm_update({t} *scale, {t} *offset, {t} *scale_velocity, "
            f"{t} *offset_velocity, const {t} *dscale, const {t} *doffset, {t} learn_rate, "
            f"{t} momentum, {t} l2_regularization)\n{{\n"
            "    if (scale_velocity == NULL) {\n        return 0;\n    }\n"
            f"    return {p}_sgdm_update_real(scale, offset, scale_velocity, offset_velocity, "
            "dscale, doffset, learn_rate, momentum, l2_regularization);\n}")
    rmsprop = (f"int {p}_rmsprop_update({t} *scale, {t} *offset, {t} *scale_sq, "
               f"{t} *offset_sq, const {t} *dscale, const {t} *doffset, {t} learn_rate, "
               f"{t} rho, {t} epsilon, {t} l2_regularization)\n{{\n"
               "    if (offset_sq == NULL && scale != NULL) {\n        scale[0] = 0.0f;\n    }\n"
               f"    return {p}_rmsprop_update_real(scale, offset, scale_sq, offset_sq, "
               "dscale, doffset, learn_rate, rho, epsilon, l2_regularization);\n}")
    for entry, body in ((f"{p}_adam_update", adam), (f"{p}_sgdm_update", sgdm),
                        (f"{p}_rmsprop_update", rmsprop)):
        source = _wrapped(plan, source, entry, body)
    with pytest.raises(VerificationError) as err:
        fw.verify_layer_on(fw.BOARDS["cortex-m4"], plan, [header, source])
    message = str(err.value)
    assert "training API checks failed" in message
    assert "api FAIL adam_update step 0 not refused" in message
    assert "api FAIL sgdm_update NULL scale_velocity not refused" in message
    assert "api FAIL a refused call wrote an output" in message
    assert "forward_train" not in message and "backward" not in message


@pytest.mark.parametrize("damage, message", [
    (lambda t: t.replace("forward rc 0", "forward rc -1", 1), "forward_train returned -1"),
    (lambda t: t.replace("solver 1 adam rc 0", "solver 1 adam rc -4"),
     "adam_update returned -4"),
    (lambda t: t.replace("api ok", "api FAIL backward NULL dy not refused"),
     "training API checks failed on the target: api FAIL backward NULL dy"),
    (lambda t: re.sub(r"\nmean 4\n[0-9a-f]{8} ", "\nmean 4\n", t, count=1),
     "mean of case 'random, batch 1' printed 3 values, expected 4"),
    (lambda t: t.replace("\nrstd 4\n", "\nrstd 5\n", 1), r"'rstd 4'"),
    (lambda t: t.replace("train fw_tr ", "trains fw_tr "), "printed no header"),
    (lambda t: t.replace("case 1 random, in place", "case 1 random, elsewhere"),
     r"case 1 \(random, in place\) was expected"),
    (lambda t: t.split("solver 2")[0], "solver 2 \\(rmsprop\\) was expected"),
])
def test_parse_train_output_refuses_a_damaged_printout(damage, message):
    run = _run("cortex-m4", "plain")
    plan = _plan("plain")
    board = fw.BOARDS["cortex-m4"]
    text = fw.run_image(Image(run.training_image, board))
    cases = list(training_cases(plan.layer, board).cases)
    solvers = list(solver_inputs(plan.layer))
    parse_train_output(text, plan, cases, solvers)      # the real printout reads back
    with pytest.raises(VerificationError, match=message):
        parse_train_output(damage(text), plan, cases, solvers)


# --------------------------------------------------------------------------- sizing


def test_training_cases_leave_out_size_sets_that_do_not_fit():
    """The Cortex-M0's 16 KiB of RAM holds a runtime size at 1 and 7 but not at its bound of
    2000: that set is left out, by name; where not even the smallest fits, the layer is
    refused by name. A Linux program holds them all."""
    layer = make_layer(name="big_rt", num_groups=2, format="SCB", input_size=[{"max": 2000}, 8],
                       training=True)
    m0 = fw.BOARDS["cortex-m0"]
    got = training_cases(layer, m0)
    assert got.skipped == ((2000,),)
    assert {tc.case.sizes for tc in got.cases} == {(1,), (7,)}
    assert {tc.case.batch for tc in got.cases} == {1, 2}      # batch 1 and batch 2 cases
    assert training_cases(layer, fw.BOARDS["aarch64-linux"]).skipped == ()
    huge = make_layer(name="huge_tr", num_groups=2, format="SSC", input_size=[64, 64, 4],
                      training=True)
    with pytest.raises(TargetUnavailable, match=r"cortex-m0: the training test vectors of "
                                                r"layer 'huge_tr' need \d+ KiB of constants "
                                                r"and \d+ KiB of RAM, more than the microbit "
                                                r"image holds \(256 KiB / 16 KiB\)"):
        training_cases(huge, m0)


# --------------------------------------------------------------------------- footprint


def _linked_text(obj, roots, work) -> int:
    """Return the code bytes a firmware keeps of an object when it calls only `roots`: a
    relocatable link that collects every section they do not reach."""
    ld = fw.require_tool("arm-none-eabi-ld")
    out = work / f"kept{len(list(work.iterdir()))}.o"
    subprocess.run([ld, "-r", "--gc-sections", *(f"-u{r}" for r in roots), "-o", str(out),
                    str(obj)], check=True, capture_output=True)
    return sum(v for k, v in fw.footprint.elf_sections(out).items()
               if k == ".text" or k.startswith(".text."))


def test_footprint_lists_training_apart(tmp_path):
    """A training layer's footprint holds the prediction kernel alone (what a firmware that
    only predicts links), against the same budget as without training; each training entry
    point has its own text, stack (by the call graph and as measured on the core) and calls."""
    run = _run("cortex-m4", "plain")
    fp = run.footprint
    plan = _plan("plain")
    p = plan.prefix
    header, source = _sources(plan)
    board = fw.BOARDS["cortex-m4"]
    write_sources(tmp_path, [header, source])
    run_compiler("footprint object", [board.cc, *fw.footprint_flags(board), "-c", source.name,
                                      "-o", "layer.o"], cwd=tmp_path)
    obj = tmp_path / "layer.o"
    work = tmp_path / "links"
    work.mkdir()
    predict = [f"{p}_predict", f"{p}_predict_with_params"]
    training = [f"{p}_{e}" for e in fw.TRAINING_ENTRIES]
    assert fp.text == _linked_text(obj, predict, work)
    assert fp.training_text == _linked_text(obj, predict + training, work) - fp.text
    for entry in fp.training:
        own = _linked_text(obj, predict + [f"{p}_{entry.name}"], work) - fp.text
        assert entry.text == own, entry
        assert entry.text > 0 and entry.stack > 0, entry
        assert entry.stack_measured >= entry.stack, entry   # callees' frames included
    assert [e.name for e in fp.training] == list(fw.TRAINING_ENTRIES)
    by_name = {e.name: e for e in fp.training}
    assert "powf" in by_name["adam_update"].calls and "powf" not in by_name["backward"].calls
    assert fp.calls == () and fp.params == 2 * 8 * 4     # the initial scale and offset
    assert 0 < fp.stack_measured
    # the prediction budget is the layer's without training
    bare = lower(make_layer(**{**LAYERS["plain"], "training": False}))
    assert fw.budgets(plan.layer) == fw.budgets(bare.layer) == (fw.TEXT_BUDGET,
                                                                fw.STACK_BUDGET)
    assert fw.check_object_calls(fp, "single", False, frozenset(),
                                 fw.training_calls(plan.layer)) == []
    record = fp.as_dict()["training"]
    assert set(record["entry_points"]) == set(fw.TRAINING_ENTRIES)
    assert fw.Footprint.from_dict(fp.layer, {**fp.as_dict()}) == fp
    table = fw.footprint_table([fw.FootprintRow(fp, 960, fw.budgets(plan.layer))])
    at = next(i for i, ln in enumerate(table) if ln.startswith("training entry points"))
    assert [ln.split()[3] for ln in table[at + 2:]] == [*training, "(together)"]
    assert table[2].split()[3] == str(fp.text)           # the kernel's row: its own text


def test_a_plain_training_layer_keeps_the_prediction_kernel_in_budget():
    """Training adds entry points, not prediction code: the plain layer's prediction kernel
    meets the budget of the same layer without training (TEXT_BUDGET / STACK_BUDGET on the
    Cortex-M4 at -Os), by the call graph and as measured on the core."""
    fp = _run("cortex-m4", "plain").footprint
    bare = lower(make_layer(**{**LAYERS["plain"], "training": False}))
    header, source = _sources(bare)
    alone = fw.measure_footprint(bare, source, header)
    assert fp.over_budget("single", *fw.budgets(bare.layer)) == [], (fp.text, fp.stack, alone)
    assert fp.stack_measured <= fw.STACK_BUDGET


def test_training_calls_are_allowed_to_training_entry_points_only():
    plain = make_layer(**LAYERS["plain"])
    assert fw.training_calls(plain) == {"powf", "fabsf", "sqrtf"}
    assert fw.training_calls(make_layer(**{**LAYERS["plain"], "training": False})) == set()
    gelu = make_layer(**{**LAYERS["double"], "activation": "gelu"})
    assert fw.training_calls(gelu) == {"pow", "fabs", "sqrt", "erf", "exp"}
    assert fw.training_calls(make_layer(**{**LAYERS["fused"]})) == {"powf", "fabsf", "sqrtf"}
    entry = fw.EntryFootprint("adam_update", 100, 64, ("powf", "sqrtf"))
    fp = fw.Footprint("t", "cortex-m4", "-Os", 300, 0, 0, 0, 64, 64, (), training=(entry,),
                      training_text=100)
    allow = fw.training_calls(plain)
    assert fw.check_object_calls(fp, "single", training_allows=allow) == []
    # by default the precision's own (all of it but an activation's derivative in double);
    # not without the training allowance, nor in the prediction kernel, nor beyond it
    assert fw.check_object_calls(fp, "single") == []
    assert fw.check_object_calls(fp, "single", training_allows=frozenset()) == ["powf"]
    f64 = replace(fp, training=(replace(entry, calls=("pow", "exp")),))
    assert fw.check_object_calls(f64, "double") == ["exp"]
    assert fw.check_object_calls(f64, "double", training_allows=fw.training_calls(gelu)) == []
    assert fw.check_object_calls(replace(fp, calls=("powf",)), "single",
                                 training_allows=allow) == ["powf"]
    wider = replace(fp, training=(replace(entry, calls=("powf", "expf", "malloc")),))
    assert fw.check_object_calls(wider, "single", training_allows=allow) == ["expf", "malloc"]


def test_cli_build_prints_the_training_table_and_manifest(tmp_path):
    spec = tmp_path / "tr.yaml"
    # budgets of its own: test_a_plain_training_layer_keeps_the_prediction_kernel_in_budget
    # holds the kernel to the core's
    spec.write_text("name: tr\nnum_groups: 4\nformat: SSCB\ninput_size: [5, 3, 8]\n"
                    "training: true\ntext_budget: 1000\nstack_budget: 160\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["build", str(spec), "--target", "cortex-m4",
                                       "-o", str(out)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    row = next(ln.split() for ln in lines if ln.split()[:3] == ["tr", "cortex-m4", "-Os"])
    assert "1000/160" in row, row
    at = next(i for i, ln in enumerate(lines) if ln.startswith("training entry points"))
    assert lines[at + 1].split() == ["layer", "cpu", "opt", "entry", "point", "text", "stack",
                                     "ran", "calls"]
    entries = [ln.split()[3] for ln in lines[at + 2:at + 8]]
    assert entries == [f"tr_{e}" for e in fw.TRAINING_ENTRIES] + ["(together)"]
    assert lines[at + 8].startswith("footprint measured with: ")
    doc = json.loads((out / "manifest.json").read_text())
    fp = doc["cortex-m4"]["footprint"]["tr"]
    assert fp["budget"] == {"text": 1000, "stack": 160}
    assert fp["training"]["text"] > fp["text"]
    assert set(fp["training"]["entry_points"]) == set(fw.TRAINING_ENTRIES)
    assert all(e["stack_measured"] > 0 for e in fp["training"]["entry_points"].values())
    for run in doc["verification"]:
        assert run["passed"] and "train: adam_update: scale" in run["cases"]
