"""Firmware targets: the generated C run on emulated Cortex-M4/M7/M55 and AArch64 Linux under
QEMU, compared with the float64 reference; the footprint; the harness and its failure modes.

Nothing here is skipped: a missing toolchain fails with the package to install
(scripts/install-toolchains.sh brings them all).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
from click.testing import CliRunner

from gncodegen.targets import firmware as fw
from gncodegen.cli import main
from gncodegen.errors import GncodegenError, TargetUnavailable, VerificationError
from gncodegen.plan import lower, lower_spec
from gncodegen.render import Source
from gncodegen.targets.c import render_c
from gncodegen.pipeline import load_spec
from gncodegen.verify import Case

from conftest import EXAMPLES, REPO, make_layer

TOOLS = ("arm-none-eabi-gcc", "arm-none-eabi-size", "arm-none-eabi-nm", "qemu-system-arm",
         "qemu-aarch64", "aarch64-linux-gnu-gcc", "riscv64-unknown-elf-gcc",
         "qemu-system-riscv32", "s390x-linux-gnu-gcc", "clang", "gcc", "g++", "make", "cmake")

# Small layers, one per memory-access shape the C template has, so images stay quick.
LAYERS = {
    "sscb": dict(name="fw_sscb", num_groups=4, format="SSCB", input_size=[4, 3, 8],
                 scale_initializer="narrow-normal", offset_initializer="narrow-normal"),
    "bssc_rowmajor": dict(name="fw_nhwc", num_groups=3, format="BSSC", layout="row-major",
                          input_size=[3, 2, 6]),
    "cb_channelwise": dict(name="fw_cb", num_groups="channel-wise", format="CB",
                           input_size=[8], offset=[0.5 * i for i in range(8)]),
    "cbt": dict(name="fw_cbt", num_groups=2, format="CBT", input_size=[6, 5]),
    "ssc_no_batch": dict(name="fw_ssc", num_groups=2, format="SSC", input_size=[4, 4, 4]),
    "sscb_double": dict(name="fw_f64", num_groups=2, format="SSCB", input_size=[3, 3, 4],
                        dtype="double", epsilon=1e-6),
}
TARGETS = tuple(fw.BOARDS)


def _layer(key):
    return make_layer(**LAYERS[key])


def _sources(plan):
    return list(render_c(plan, "test.yaml"))


_runs: dict[tuple[str, str], fw.LayerRun] = {}


def _run(target: str, key: str) -> fw.LayerRun:
    """Return the (memoized) verification of one test layer on one target."""
    if (target, key) not in _runs:
        plan = lower(_layer(key))
        _runs[target, key] = fw.verify_layer_on(fw.BOARDS[target], plan,
                                                _sources(plan))
    return _runs[target, key]


# --------------------------------------------------------------------------- toolchains


@pytest.mark.parametrize("tool", TOOLS)
def test_toolchain_is_installed(tool):
    # Fails (not skips) with the package to install when CI did not run the install script.
    assert fw.require_tool(tool)


def test_missing_tool_names_its_package(monkeypatch):
    monkeypatch.setattr(fw.boards.shutil, "which", lambda tool: None)
    with pytest.raises(TargetUnavailable, match=r"'qemu-system-arm' not found on PATH: install "
                                                r"the Debian package\(s\) qemu-system-arm"):
        fw.require_tool("qemu-system-arm")


def test_install_script_is_idempotent_and_quiet():
    script = REPO / "scripts" / "install-toolchains.sh"
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0
    check = subprocess.run([str(script), "--check"], capture_output=True, text=True,
                           check=False)
    assert check.returncode == 0, check.stderr
    # Everything is installed, so a second run must neither touch apt nor print anything.
    again = subprocess.run([str(script)], capture_output=True, text=True, check=False,
                           timeout=60)
    assert (again.returncode, again.stdout, again.stderr) == (0, "", "")


def test_install_script_rejects_unknown_arguments():
    proc = subprocess.run([str(REPO / "scripts" / "install-toolchains.sh"), "--frobnicate"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 1
    assert "unknown argument '--frobnicate'" in proc.stderr


# --------------------------------------------------------------------------- runs under QEMU


@pytest.mark.parametrize("key", list(LAYERS))
@pytest.mark.parametrize("target", TARGETS)
def test_layer_matches_reference_on_target(target, key):
    run = _run(target, key)
    report = run.report
    failed = [(c.case, c.max_rel, c.nan_mismatch) for c in report.cases if not c.passed]
    assert report.passed, f"{target}/{key}: {failed}"
    board = fw.BOARDS[target]
    assert report.runner == f"{board.runner_name} {board.opt}"
    assert dict(report.build)["flags"].split().count(board.opt) == 1
    names = [c.case for c in report.cases]
    # The verification cases: random, constant groups, mean 1e4 std 1, in place, batch 1 and > 1.
    assert "random, batch 1" in names and "random, in place" in names
    assert "constant groups" in names and "mean 10000, std 1" in names
    assert "caller's scale and offset" in names
    if _layer(key).has_batch:
        assert any(re.fullmatch(r"random, batch [2-9]\d*", n) for n in names), names


@pytest.mark.parametrize("target", TARGETS)
def test_matlab_example_runs_on_target(target):
    spec = load_spec(EXAMPLES / "matlab_gn.yaml")
    plan = lower_spec(spec)[0]
    if target == "cortex-m0":
        # 16 KiB of RAM: an observation of 11520 floats does not fit, and says so by name.
        with pytest.raises(TargetUnavailable, match=r"cortex-m0: the test vectors of layer "
                           r"'matlab_gn' need \d+ KiB of constants and \d+ KiB of RAM, more "
                           r"than the microbit image holds \(256 KiB / 16 KiB\)"):
            fw.verify_layer_on(fw.BOARDS[target], plan, _sources(plan))
        return
    run = fw.verify_layer_on(fw.BOARDS[target], plan, _sources(plan))
    assert run.report.passed, [(c.case, c.max_rel) for c in run.report.cases]
    assert "random, batch 2" in [c.case for c in run.report.cases]


def test_one_wrong_output_value_fails_the_comparison():
    plan = lower(_layer("sscb"))

    def corrupt(outputs):
        y = outputs["random, batch 1"].copy()
        y[5] += 1e-3 * np.abs(y).max()         # 100x the single-precision tolerance
        return {**outputs, "random, batch 1": y}

    run = fw.verify_layer_on(fw.BOARDS["cortex-m4"], plan, _sources(plan),
                             corrupt=corrupt)
    by_case = {c.case: c for c in run.report.cases}
    assert not run.report.passed
    assert not by_case["random, batch 1"].passed
    assert all(c.passed for name, c in by_case.items() if name != "random, batch 1")


def _wrapped(plan, source, entry, body):
    """Return source with `entry` renamed <entry>_real and redefined as body (C text).

    Relies only on the header contract, so it survives changes to the C template.
    """
    include = f'#include "{plan.prefix}.h"\n'
    assert include in source.text
    text = source.text.replace(include, f"{include}#define {entry} {entry}_real\n", 1)
    return Source(source.name, f"{text}\n#undef {entry}\n{body}\n")


def test_an_unwritten_output_is_a_nan_and_fails():
    # The harness fills y with NaNs before each call; a kernel that skips an element fails.
    plan = lower(_layer("sscb"))
    header, source = _sources(plan)
    p = plan.prefix
    skipping = _wrapped(plan, source, f"{p}_predict",
                        f"int {p}_predict(const float *x, float *y, size_t batch)\n{{\n"
                        f"    return batch == 0u ? 0 : {p}_predict_real(x, y, batch - 1u);\n}}")
    run = fw.verify_layer_on(fw.BOARDS["cortex-m4"], plan, [header, skipping])
    by_case = {c.case: c for c in run.report.cases}
    assert by_case["random, batch 1"].nan_mismatch == plan.observation_numel
    assert not by_case["random, batch 2"].passed
    assert by_case["caller's scale and offset"].passed    # the untouched entry point
    assert not run.report.passed


def test_stack_depth_is_measured_on_the_core():
    # The harness paints the free stack before each call; a kernel that puts 1 KiB of locals
    # on it must measure at least that, and the footprint carries the figure.
    plan = lower(_layer("ssc_no_batch"))
    header, source = _sources(plan)
    p = plan.prefix
    deep = _wrapped(plan, source, f"{p}_predict",
                    f"int {p}_predict(const float *x, float *y, size_t batch)\n{{\n"
                    "    volatile float scratch[256];\n"
                    "    for (size_t i = 0; i < 256u; ++i) {\n"
                    "        scratch[i] = (float)i;\n    }\n"
                    f"    return {p}_predict_real(x, y, batch) + (scratch[255] > 1e6f);\n}}")
    target = fw.BOARDS["cortex-m4"]
    shallow = fw.verify_layer_on(target, plan, [header, source])
    measured = fw.verify_layer_on(target, plan, [header, deep])
    assert 0 < shallow.measured_stack < 1024
    assert measured.measured_stack >= 1024 + shallow.footprint.stack // 2
    assert measured.footprint.stack_measured == measured.measured_stack
    assert measured.footprint.stack >= 1024              # -fstack-usage sees the frame too
    assert any("measured under QEMU" in p or p.startswith("stack ")
               for p in measured.footprint.over_budget("single"))


def test_image_without_fpu_enabled_reports_the_fault(monkeypatch):
    # Without the CPACR write the first FP instruction faults; the handler says so and stops.
    original = fw.qemu.support_sources

    def no_fpu(target):
        return [Source(s.name, s.text.replace("SCB_CPACR |= CPACR_CP10_CP11_FULL;", ""))
                for s in original(target)]

    monkeypatch.setattr(fw.qemu, "support_sources", no_fpu)
    plan = lower(_layer("sscb"))
    with pytest.raises(VerificationError, match=r"cortex-m4: test image failed .*FAULT: "
                                                r"(HardFault|UsageFault)"):
        fw.verify_layer_on(fw.BOARDS["cortex-m4"], plan, _sources(plan))


def test_hanging_image_is_stopped_by_the_timeout(monkeypatch):
    plan = lower(_layer("ssc_no_batch"))
    target = fw.BOARDS["cortex-m4"]
    harness = fw.render_harness(plan, fw.harness_for(plan, target,
                                                     fw.firmware_cases(plan.layer, target)))
    hang = Source(harness.name, harness.text.replace(
        "int main(void)\n{", "int main(void)\n{\n    for (volatile int spin = 1; spin;) {\n    }"))
    assert hang.text != harness.text
    image = fw.build_image(target, plan, _sources(plan), hang)
    with pytest.raises(VerificationError, match=r"did not finish in 2 s \(a fault loops"):
        fw.run_image(image, timeout=2)


def test_m55_image_exercises_mve():
    # The -O3 build vectorizes with Helium, so the run proves the start-up enabled MVE.
    run = _run("cortex-m55", "sscb")
    objdump = fw.require_tool("arm-none-eabi-objdump")
    text = subprocess.run([objdump, "-d", str(run.image.parent / "fw_sscb.o")],
                          capture_output=True, text=True, check=True).stdout
    assert re.search(r"\bv\w+(\.[fiu]\d+)?\s+q[0-7]", text), "no MVE instruction in the kernel"


# --------------------------------------------------------------------------- instruction count

# A loop of known length: two instructions an iteration (decrement, branch back).
_LOOP = {
    "arm": '".syntax unified\\n1: subs %0, %0, #1\\n bne 1b" : "+l"(n) : : "cc"',
    "riscv": '"1: addi %0, %0, -1\\n bnez %0, 1b" : "+r"(n)',
}


@pytest.mark.parametrize("target", [n for n, b in fw.BOARDS.items() if b.counts_instructions])
def test_instruction_count_matches_a_loop_of_known_length(target):
    """fw_count on each board, turned into instructions by its clock, counts a loop of 2n
    instructions to within two, past a fixed cost of the call; the longest crosses SysTick's
    24-bit period several times."""
    board = fw.BOARDS[target]
    asm = _LOOP["riscv" if board.name.startswith("riscv") else "arm"]
    lengths = (1000, 100_000, 20_000_000)
    main_c = "\n".join([
        '#include <stdint.h>', '#include "fw_io.h"', '',
        'static void loop(uint32_t n)', '{', f'    __asm__ volatile({asm});', '}', '',
        'static void write_u64(uint64_t v)', '{', '    char t[24];', '    int i = 23;',
        "    t[i] = '\\0';",
        "    do {", "        t[--i] = (char)('0' + (int)(v % 10u));", "        v /= 10u;",
        "    } while (v != 0u);", '    fw_write(&t[i]);', '}', '',
        'int main(void)', '{', '    fw_count_start();',
        *[line for n in lengths for line in (
            '    {', '        const uint64_t start = fw_count();', f'        loop({n}u);',
            '        write_u64(fw_count() - start);', '        fw_write("\\n");', '    }')],
        '    fw_write("end\\n");', '    return 0;', '}', ''])
    plan = lower(_layer("ssc_no_batch"))
    image = fw.build_image(board, plan, [], Source("loop.c", main_c))
    counts = [int(v) for v in fw.run_image(image).split()[:-1]]
    assert len(counts) == len(lengths)
    insns = [board.instructions(c) for c in counts]
    overhead = insns[0] - 2 * lengths[0]        # the call and reading the counter
    assert 0 <= overhead < 64, insns
    for n, count, got in zip(lengths[1:], counts[1:], insns[1:]):
        # SysTick's interrupt runs a few instructions each period, and they count too.
        periods = count >> 24 if board.count_hz < 1_000_000_000 else 0
        assert abs(got - overhead - 2 * n) <= 2 + 8 * periods, (n, got, overhead)
    if board.count_hz < 1_000_000_000:
        assert counts[-1] > 2 << 24          # SysTick's period ended and was counted


def test_soft_float_cores_report_their_instruction_count(tmp_path):
    """The footprint table and the manifest carry the instructions one observation ran."""
    spec = tmp_path / "features_channelwise.yaml"
    shutil.copy(EXAMPLES / "features_channelwise.yaml", spec)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["build", str(spec), "--target", "cortex-m0",
                                       "-o", str(out)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    at = next(i for i, ln in enumerate(lines) if ln.startswith("layer ") and "insns" in ln)
    header, row = lines[at], lines[at + 1]
    assert row.split()[:2] == ["features_channelwise", "cortex-m0"]
    column = header.split().index("insns")
    insns = int(row.split()[column])
    fp = json.loads((out / "manifest.json").read_text())["cortex-m0"]["footprint"][
        "features_channelwise"]
    assert fp["instructions_per_observation"] == insns
    # Soft float: every element costs tens of instructions in the helpers, not a handful.
    assert insns > 20 * load_spec(spec).layers[0].observation_numel


# --------------------------------------------------------------------------- harness pieces


@pytest.mark.parametrize("value", [0.0, -0.0, 1.0, -2.5, 1e-40, 3.4028234663852886e38,
                                   0.1, 1e4 + 0.5])
@pytest.mark.parametrize("dtype", ["single", "double"])
def test_hex_literal_is_exact(value, dtype):
    v = float(np.float32(value)) if dtype == "single" else value
    text = fw.hex_literal(v, dtype)
    assert text.endswith("f") == (dtype == "single")
    back = float.fromhex(text.rstrip("f"))
    assert back == v and np.signbit(back) == np.signbit(v)


def _printout(plan, cases, values, api="api ok", rc=0):
    lines = [f"harness {plan.prefix} {len(cases)}"]
    for i, (case, y) in enumerate(zip(cases, values)):
        lines.append(f"case {i} {case.name} rc {rc} numel {len(y)}")
        words = [f"{w:08x}" for w in np.asarray(y, np.float32).view(np.uint32)]
        lines += [" ".join(words[j:j + 8]) for j in range(0, len(words), 8)]
    return "\n".join([*lines, api, "end"]) + "\n"


def test_parse_output_reads_exact_values():
    plan = lower(_layer("ssc_no_batch"))
    cases = [Case("a", np.zeros(64), 1), Case("b", np.zeros(64), 1)]
    values = [np.arange(64, dtype=np.float32) / 3, -np.arange(64, dtype=np.float32)]
    out = fw.parse_output(_printout(plan, cases, values), plan, cases)
    np.testing.assert_array_equal(out["a"], values[0].astype(np.float64))
    np.testing.assert_array_equal(out["b"], values[1].astype(np.float64))


@pytest.mark.parametrize("damage, message", [
    (lambda t: t.replace("rc 0", "rc -1", 1), "returned -1"),
    (lambda t: t.replace("api ok", "api FAIL NULL x not refused"), "API checks failed"),
    (lambda t: "\n".join(t.split("\n")[:3] + t.split("\n")[4:]), "printed 56 values"),
    (lambda t: t.replace("harness ", "hardness "), "no header"),
    (lambda t: t.replace("case 1 b", "case 1 c"), r"expected case 1 \(b\)"),
])
def test_parse_output_refuses_a_damaged_printout(damage, message):
    plan = lower(_layer("ssc_no_batch"))
    cases = [Case("a", np.zeros(64), 1), Case("b", np.zeros(64), 1)]
    text = damage(_printout(plan, cases, [np.ones(64), np.ones(64)]))
    with pytest.raises(VerificationError, match=message):
        fw.parse_output(text, plan, cases)


def test_cases_too_big_for_the_board_are_refused_by_name():
    layer = make_layer(name="huge", num_groups=2, format="SSC", input_size=[512, 512, 4])
    with pytest.raises(TargetUnavailable, match=r"cortex-m55: the test vectors of layer "
                                                r"'huge' need .* mps3-an547"):
        fw.firmware_cases(layer, fw.BOARDS["cortex-m55"])
    # A Linux program holds more, but its vectors are C literals: past 32 MiB, one line.
    assert fw.firmware_cases(layer, fw.BOARDS["aarch64-linux"])
    bigger = make_layer(name="huger", num_groups=2, format="SSC", input_size=[1024, 1024, 4])
    with pytest.raises(TargetUnavailable, match=r"aarch64-linux: the test vectors of layer "
                                                r"'huger' take \d+ MiB, more than the 32 MiB"):
        fw.firmware_cases(bigger, fw.BOARDS["aarch64-linux"])


def test_harness_and_linker_script_are_deterministic():
    plan = lower(_layer("sscb"))
    target = fw.BOARDS["cortex-m55"]
    cases = fw.firmware_cases(plan.layer, target)
    first = fw.render_harness(plan, fw.harness_for(plan, target, cases))
    again = fw.render_harness(plan, fw.harness_for(plan, target,
                                                   fw.firmware_cases(plan.layer, target)))
    assert first == again
    script = fw.render_linker_script(target).text
    assert "VECTORS (rx) : ORIGIN = 0x00000000" in script
    assert "FLASH (rx)  : ORIGIN = 0x01000000, LENGTH = 2097152" in script
    assert "RAM   (rwx) : ORIGIN = 0x20000000, LENGTH = 524288" in script


# --------------------------------------------------------------------------- footprint


def _example_plans():
    out = []
    for path in sorted(EXAMPLES.glob("*.yaml")):
        spec = load_spec(path)
        out += [(path.stem, plan) for plan in lower_spec(spec)]
    return out


def test_matlab_example_footprint_meets_the_budget():
    plan = lower_spec(load_spec(EXAMPLES / "matlab_gn.yaml"))[0]
    header, source = _sources(plan)
    fp = fw.measure_footprint(plan, source, header)
    assert (fp.cpu, fp.opt) == ("cortex-m4", "-Os")
    assert fp.text <= fw.TEXT_BUDGET and fp.stack <= fw.STACK_BUDGET, fp
    assert (fp.rodata, fp.data, fp.bss) == (0, 0, 0), fp        # zero RAM, no hidden tables
    assert fp.params == 2 * 20 * 4                               # scale and offset, in flash
    assert fp.calls == ()                  # vsqrt.f32 in place of sqrtf: no libm call at all
    assert fp.over_budget("single") == []


def _single_precision_plans():
    """Every single-precision layer of the examples, then every single-precision test shape."""
    plans = [(plan.prefix, plan) for _, plan in _example_plans()]
    plans += [(key, lower(_layer(key))) for key in LAYERS]
    return [(name, plan) for name, plan in plans if plan.layer.dtype == "single"]


@pytest.mark.parametrize("name, plan", _single_precision_plans(),
                         ids=lambda v: getattr(v, "prefix", v))
def test_single_precision_kernels_meet_the_budget(name, plan):
    # Issue 5's goal for every single-precision layout, not just the MATLAB example: kernel
    # text <= 400 B and stack <= 96 B on Cortex-M4 at -Os, by the call graph and as measured
    # on the core (the image's calls, sqrtf's frame included if it were called).
    run = fw.verify_layer_on(fw.BOARDS["cortex-m4"], plan, _sources(plan))
    fp = run.footprint
    assert run.report.passed, name
    assert (fp.cpu, fp.opt) == ("cortex-m4", "-Os")
    text_budget, stack_budget = fw.budgets(plan.layer)   # more for runtime sizes, activations
    if not (plan.runtime_sizes or plan.layer.activation.fused):
        assert (text_budget, stack_budget) == (fw.TEXT_BUDGET, fw.STACK_BUDGET)
    assert fp.text <= text_budget, fp
    assert fp.stack <= stack_budget, fp
    assert 0 < run.measured_stack <= stack_budget, fp
    assert fp.stack_measured == run.measured_stack
    assert fp.calls == (), fp                            # vsqrt.f32, not sqrtf
    assert fp.over_budget("single", text_budget, stack_budget) == []


@pytest.mark.parametrize("stem, plan", _example_plans(), ids=lambda v: getattr(v, "prefix", v))
def test_example_objects_keep_the_firmware_rules(stem, plan):
    # Every example: no RAM, parameters counted apart, nothing (single: the square root is
    # the FPU's vsqrt.f32) or the soft-double helpers and sqrt (double) called, no recursion
    # (measure_footprint raises). The budgets: test_single_precision_kernels_meet_the_budget.
    header, source = _sources(plan)
    fp = fw.measure_footprint(plan, source, header)
    assert fp.data == 0 and fp.bss == 0, fp
    assert fp.params == 2 * plan.num_channels * plan.dtype.bytes
    assert fw.check_object_calls(fp, plan.layer.dtype) == [], fp.calls
    if plan.layer.dtype == "single":
        assert fp.calls == ()


def test_over_budget_is_reported():
    fp = fw.Footprint("x", "cortex-m4", "-Os", text=401, rodata=0, data=4, bss=0, params=8,
                      stack=97, calls=("sqrtf",))
    problems = fp.over_budget("single")
    assert problems == ["4 bytes of RAM (.data/.bss); the kernel must keep none",
                        "text 401 B > 400 B", "stack 97 B > 96 B"]
    assert fp.over_budget("double") == [problems[0]]


def test_double_arithmetic_in_single_code_is_caught():
    # An explicit cast hides the promotion from -Wdouble-promotion; the object check sees it.
    plan = lower(_layer("sscb"))
    header, source = _sources(plan)
    p = plan.prefix
    doubled = _wrapped(plan, source, f"{p}_predict",
                       f"int {p}_predict(const float *x, float *y, size_t batch)\n{{\n"
                       f"    const int rc = {p}_predict_real(x, y, batch);\n"
                       "    y[0] = (float)sqrt((double)y[0]);\n    return rc;\n}")
    fp = fw.measure_footprint(plan, doubled, header)
    bad = fw.check_object_calls(fp, "single")
    assert "sqrt" in bad and any(s.startswith("__aeabi_") for s in bad), bad


def test_a_core_without_fpu_may_call_the_float_helpers_only():
    """On the Cortex-M3 (soft float) single precision calls the run-time ABI's float helpers,
    which the object check allows there, while a double helper is still caught."""
    plan = lower(_layer("sscb"))
    board = fw.BOARDS["cortex-m3"]
    assert board.soft_float and not fw.BOARDS["cortex-m4"].soft_float
    run = fw.verify_layer_on(board, plan, _sources(plan))
    assert run.report.passed
    calls = run.footprint.calls
    assert any(c.startswith("__aeabi_f") for c in calls), calls
    assert fw.check_object_calls(run.footprint, "single", soft_float=True) == []
    assert fw.check_object_calls(run.footprint, "single") != []     # on an FPU core: caught
    promoted = replace(run.footprint, calls=(*calls, "__aeabi_f2d", "__aeabi_dmul"))
    assert fw.check_object_calls(promoted, "single", soft_float=True) == ["__aeabi_f2d",
                                                                          "__aeabi_dmul"]
    # The text and stack budgets are the Cortex-M4's at -Os, not a soft-float core's.
    assert run.footprint.over_budget("single") == []
    assert replace(run.footprint, cpu="cortex-m4").over_budget("single") != []


def test_heap_and_mutable_state_are_caught():
    plan = lower(_layer("sscb"))
    header, source = _sources(plan)
    p = plan.prefix
    stateful = Source(source.name, source.text + (
        "\n#include <stdlib.h>\n"
        f"float *{p}_scratch;\n"
        f"int {p}_debug_hook(void);\n"
        f"int {p}_debug_hook(void)\n{{\n    {p}_scratch = malloc(sizeof *{p}_scratch);\n"
        f"    return {p}_scratch != NULL;\n}}\n"))
    fp = fw.measure_footprint(plan, stateful, header)
    assert fw.check_object_calls(fp, "single") == ["malloc"]
    assert fp.bss == 4 and fp.over_budget("single")[0].startswith("4 bytes of RAM")


def test_recursion_is_caught():
    plan = lower(_layer("sscb"))
    header, source = _sources(plan)
    p = plan.prefix
    # Two calls to itself: gcc can turn one tail call into a loop, not both.
    recursive = _wrapped(
        plan, source, f"{p}_predict",
        f"int {p}_predict(const float *x, float *y, size_t batch)\n{{\n"
        f"    if (batch > 7u) {{\n        const int r = {p}_predict(x, y, batch / 2u);\n"
        f"        return r + {p}_predict(x, y, batch / 3u);\n    }}\n"
        f"    return {p}_predict_real(x, y, batch);\n}}")
    with pytest.raises(GncodegenError, match=rf"recursion in the generated code: .*{p}_predict"):
        fw.measure_footprint(plan, recursive, header)


# --------------------------------------------------------------------------- command line


def test_cli_verify_prints_results_and_footprint_table():
    result = CliRunner().invoke(main, ["verify", str(EXAMPLES / "matlab_gn.yaml"),
                                       "--target", "cortex-m4"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    # Both kernels a build can select ran on the core: the compact nest (-Os), the fast (-O2).
    for opt in ("-Os", "-O2"):
        assert re.search(rf"matlab_gn\s+cortex-m4\s+qemu mps2-an386 {opt}\s+yes\s+\S+\s+1e-05"
                         r"\s+pass", result.output), opt
    header = next(i for i, ln in enumerate(lines) if ln.startswith("layer ") and "stack" in ln)
    row = lines[header + 1].split()
    assert row[:3] == ["matlab_gn", "cortex-m4", "-Os"] and row[-1] == "-"   # no outside calls
    assert lines[header + 2].startswith("footprint measured with: arm-none-eabi-gcc -std=c99 ")
    assert "-Os -mcpu=cortex-m4" in lines[header + 2]


def test_cli_build_records_footprint_in_manifest(tmp_path):
    spec = tmp_path / "matlab_gn.yaml"
    shutil.copy(EXAMPLES / "matlab_gn.yaml", spec)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["build", str(spec), "--target", "cortex-m4",
                                       "-o", str(out)])
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "manifest.json").read_text())
    fp = doc["cortex-m4"]["footprint"]["matlab_gn"]
    assert fp["cpu"] == "cortex-m4" and fp["opt"] == "-Os"
    assert set(fp) >= {"text", "rodata", "data", "bss", "params", "stack", "stack_measured",
                       "calls"}
    assert fp["stack_measured"] > 0
    assert fp["text"] <= fw.TEXT_BUDGET and fp["stack"] <= fw.STACK_BUDGET
    runs = doc["verification"]
    assert [(v["target"], v["runner"]) for v in runs] == [("cortex-m4", "qemu mps2-an386 -Os"),
                                                          ("cortex-m4", "qemu mps2-an386 -O2")]
    for run, opt in zip(runs, ("-Os", "-O2")):
        assert run["build"]["compiler"].startswith("arm-none-eabi-gcc")
        assert opt in run["build"]["flags"].split() and "-mcpu=cortex-m4" in run["build"]["flags"]


def test_budget_overrun_fails_the_build_unless_the_spec_raises_it(tmp_path):
    """The footprint table shows each layer's budget; over it the build fails (exit 1, nothing
    written), naming the spec keys that raise it; the manifest records budget, flags and the
    caller's buffer bytes."""
    text = (EXAMPLES / "matlab_gn.yaml").read_text()
    tight = tmp_path / "tight.yaml"
    tight.write_text(text + "\ntext_budget: 100\nstack_budget: 32\n")
    result = CliRunner().invoke(main, ["build", str(tight), "--target", "cortex-m4",
                                       "-o", str(tmp_path / "tight")])
    assert result.exit_code == 1, result.output
    assert re.search(r"FAIL: matlab_gn on cortex-m4 -Os: text \d+ B > 100 B \(a spec may "
                     r"raise text_budget and stack_budget\)", result.output), result.output
    assert re.search(r"FAIL: matlab_gn on cortex-m4 -Os: stack \d+ B > 32 B", result.output)
    assert not (tmp_path / "tight").exists()
    roomy = tmp_path / "roomy.yaml"
    roomy.write_text(text + "\ntext_budget: 1000\n")
    result = CliRunner().invoke(main, ["build", str(roomy), "--target", "cortex-m4",
                                       "-o", str(tmp_path / "roomy")])
    assert result.exit_code == 0, result.output
    row = next(ln for ln in result.output.splitlines() if ln.startswith("matlab_gn  cortex-m4  -Os"))
    assert " 1000/96 " in row, row
    fp = json.loads((tmp_path / "roomy" / "manifest.json").read_text())["cortex-m4"]["footprint"]
    fp = fp["matlab_gn"]
    assert fp["budget"] == {"text": 1000, "stack": 96}
    assert "-Os" in fp["flags"].split() and "-mcpu=cortex-m4" in fp["flags"].split()
    assert fp["buffer_bytes_per_observation"] == 2 * 4 * 24 * 24 * 20


def test_every_core_measures_its_own_footprint():
    """No core repeats another's row: AArch64 Linux and the M7 measure their own objects."""
    plan = lower(_layer("sscb"))
    for name in ("aarch64-linux", "cortex-m7", "cortex-m33"):
        run = fw.verify_layer_on(fw.BOARDS[name], plan, _sources(plan), opt="-Os")
        assert run.footprint.cpu == name and run.footprint.opt == "-Os"
        assert (run.footprint.stack_measured is None) == (name == "aarch64-linux")


def test_cli_verifies_the_users_own_flags(tmp_path):
    """--cflags: the generated code compiled with exactly the user's flags (after the core's)
    runs on the core too, and the manifest says so; a flag that is not one is refused."""
    spec = tmp_path / "matlab_gn.yaml"
    shutil.copy(EXAMPLES / "matlab_gn.yaml", spec)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["build", str(spec), "--target", "cortex-m4", "-o", str(out),
                                       "--cflags", "-O1 -fno-inline -ffunction-sections"])
    assert result.exit_code == 0, result.output
    assert re.search(r"matlab_gn\s+cortex-m4\s+qemu mps2-an386 --cflags\s+yes.*pass",
                     result.output), result.output
    runs = json.loads((out / "manifest.json").read_text())["verification"]
    assert runs[-1]["build"]["flags"] == ("-mcpu=cortex-m4 -mthumb -mfpu=fpv4-sp-d16 "
                                          "-mfloat-abi=hard -O1 -fno-inline -ffunction-sections")
    for target, bad, words in (
            ("cortex-m4", "-O2 -o elsewhere", "'-o' is not a compile flag"),
            ("cortex-m4", "main.c", "'main.c' is not a compile flag"),
            ("cortex-m4", "-O2 '", "cannot be split"),
            ("c", "-O3", "only cortex-m0, cortex-m3, cortex-m4")):    # ignored, silently
        proc = subprocess.run([sys.executable, "-m", "gncodegen", "verify", str(spec),
                               "--target", target, "--cflags", bad],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.startswith("error: --cflags: ") and words in proc.stderr, proc.stderr
        assert len(proc.stderr.splitlines()) == 1


def test_cli_firmware_group_runs_every_target(tmp_path):
    """--target firmware verifies on every core and writes one project for all of them: the
    Makefile asks which core, and builds and runs the one named."""
    out = tmp_path / "all"
    result = CliRunner().invoke(main, ["build", str(EXAMPLES / "features_channelwise.yaml"),
                                       "--target", "firmware", "-o", str(out)])
    assert result.exit_code == 0, result.output
    for target in TARGETS:
        assert re.search(rf"features_channelwise\s+{target}\s.*pass", result.output), target
        assert (out / f"{target}.mk").is_file() and (out / f"{target}.cmake").is_file()
    asked = subprocess.run(["make", "-C", str(out)], capture_output=True, text=True,
                           timeout=60, check=False)
    assert asked.returncode != 0
    assert "name the core: make BOARD=<one of: " in asked.stderr, asked.stderr
    assert all(t in asked.stderr for t in TARGETS), asked.stderr
    ran = subprocess.run(["make", "-C", str(out), "BOARD=cortex-m33", "run"],
                         capture_output=True, text=True, timeout=120, check=False)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "features_channelwise: checksums ok\nall layers ok\n" in ran.stdout + ran.stderr


# --------------------------------------------------------------------------- generated projects

# One build per core family: Armv7-M with an FPU, Armv6-M without, RISC-V, AArch64 Linux,
# Armv8-M; and single, double, several layers and a runtime size among them.
PROJECTS = {"cortex-m4": "matlab_gn", "cortex-m0": "features_channelwise",
            "riscv32": "multi_layer", "aarch64-linux": "nhwc_rowmajor",
            "cortex-m33": "sequence_runtime"}


def _project(tmp_path, target: str):
    out = tmp_path / "project"
    spec = tmp_path / f"{PROJECTS[target]}.yaml"
    shutil.copy(EXAMPLES / spec.name, spec)
    if PROJECTS[target] == "nhwc_rowmajor":
        shutil.copytree(EXAMPLES / "params", tmp_path / "params")
    result = CliRunner().invoke(main, ["build", str(spec), "--target", target, "-o", str(out)])
    assert result.exit_code == 0, result.output
    layers = load_spec(spec).layers
    return out, [layer.name for layer in layers]


def _checked(printed: str, layers: list[str]) -> None:
    for name in layers:
        assert f"{name}: checksums ok\n" in printed, printed
    assert "\nall layers ok\n" in printed and "WRONG" not in printed, printed


@pytest.mark.parametrize("target", list(PROJECTS))
def test_generated_project_builds_and_runs_with_make_and_cmake(tmp_path, target):
    """The project written beside the layers builds out of the box with make and with CMake
    and its toolchain file, runs under QEMU, and every layer's checksums match the reference;
    building leaves the generated folder as it was, so the next build can replace it."""
    out, layers = _project(tmp_path, target)
    before = sorted(p.name for p in out.iterdir())
    made = subprocess.run(["make", "-C", str(out), "run"], capture_output=True, text=True,
                          timeout=300, check=False)
    assert made.returncode == 0, made.stdout + made.stderr
    _checked(made.stdout + made.stderr, layers)    # semihosting writes to QEMU's stderr
    assert "-Werror" in made.stdout and "warning" not in made.stdout + made.stderr
    assert sorted(p.name for p in out.iterdir()) == before
    assert (tmp_path / "project-build" / target / "fw_demo.elf").is_file()

    build = tmp_path / "cmake-build"
    for step in (["cmake", "-S", str(out), "-B", str(build),
                  f"-DCMAKE_TOOLCHAIN_FILE={out / f'{target}.cmake'}"],
                 ["cmake", "--build", str(build)],
                 ["cmake", "--build", str(build), "--target", "run"]):
        done = subprocess.run(step, capture_output=True, text=True, timeout=300, check=False)
        assert done.returncode == 0, done.stdout + done.stderr
    _checked((done.stdout + done.stderr).replace("[100%] Built target run\n", ""), layers)
    assert sorted(p.name for p in out.iterdir()) == before


def test_generated_project_check_catches_a_wrong_output(tmp_path):
    """The program's check is real: an expected sum of squares 0.1 % off fails the run."""
    out, layers = _project(tmp_path, "cortex-m4")
    demo = out / "fw_demo.c"
    text = demo.read_text()
    m = re.search(r"sum_sq, (0x[0-9a-fp.+-]+), ", text)
    assert m, text
    demo.write_text(text.replace(m.group(0),
                                 f"sum_sq, {(float.fromhex(m.group(1)) * 0.999).hex()}, "))
    ran = subprocess.run(["make", "-C", str(out), "run"], capture_output=True, text=True,
                         timeout=300, check=False)
    assert ran.returncode != 0
    assert "matlab_gn: checksums WRONG\nFAILED\n" in ran.stdout + ran.stderr, ran.stderr


def test_demo_input_is_exact_and_spread():
    x = fw.project.demo_input(4096)
    assert np.all(x == x.astype(np.float32)) and -2 <= x.min() < -1.9 and 1.9 < x.max() < 2
    assert len(np.unique(x)) > 4000


def test_project_is_deterministic():
    spec = load_spec(EXAMPLES / "multi_layer.yaml")
    records = tuple(fw.CTarget().lower(p) for p in lower_spec(spec))

    def render():
        return [(s.name, s.text) for s in fw.render_project(
            fw.project_for(fw.BOARDS["cortex-m4"], records, "multi_layer.yaml"))]

    assert render() == render()


# --------------------------------------------------------------------------- the example project


def test_firmware_example_project_builds_and_runs(tmp_path):
    build = tmp_path / "build"
    make = ["make", "-C", str(EXAMPLES / "firmware"), f"BUILD={build}",
            f"PYTHON={sys.executable}"]
    built = subprocess.run([*make, "all"], capture_output=True, text=True, check=False,
                           timeout=300)
    assert built.returncode == 0, built.stdout + built.stderr
    assert (build / "generated" / "manifest.json").is_file()
    ran = subprocess.run([*make, "run"], capture_output=True, text=True, check=False,
                         timeout=120)
    printed = ran.stdout + ran.stderr
    assert ran.returncode == 0, printed
    assert len(re.findall(r"group \d: mean \S+ variance \S+ ok\n", printed)) == 4, printed
    assert "matlab_gn normalized in place: ok" in printed
