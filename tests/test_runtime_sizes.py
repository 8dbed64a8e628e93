"""Runtime sizes: input_size entries left to run time (null, or {max: N}) become size_t
arguments after batch. The spec rules, the generated header and entry points, verification at
several sizes on the host C (each build: -O2, native, -Os) and on the firmware cores, the
numerics at a large runtime group, and the targets that do not take them yet.
"""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest

from gncodegen.dtypes import DTYPES, round_to_dtype
from gncodegen.errors import SpecError
from gncodegen.plan import lower
from gncodegen.reference import from_canonical, to_flat
from gncodegen.spec import RuntimeSize
from gncodegen.targets.c import render_c
from gncodegen.targets.c.runner import c_runner
from gncodegen.verify import Case, verification_sizes, verify_layer

from conftest import build_layers, make_layer
from test_c_kernels import BUILDS

# One layer per shape the nests take: a contiguous group (SSCB), a stride beyond B (CBT), channels
# fastest (BSSC row-major), a strided nest (SCB row-major), two runtime sizes with a bound,
# double precision, no B.
LAYERS = {
    "sscb": dict(name="rt_sscb", num_groups=2, format="SSCB", input_size=[None, {"max": 12}, 4],
                 scale_initializer="narrow-normal", offset_initializer="narrow-normal"),
    "cbt": dict(name="rt_cbt", num_groups=3, format="CBT", input_size=[6, None]),
    "bssc": dict(name="rt_bssc", num_groups=2, format="BSSC", layout="row-major",
                 input_size=[{"max": 9}, 5, 4]),
    "scb_row": dict(name="rt_scb", num_groups=4, format="SCB", layout="row-major",
                    input_size=[None, 8]),
    "double": dict(name="rt_f64", num_groups=2, format="SSCB", input_size=[3, None, 4],
                   dtype="double", epsilon=1e-6),
    "ssc": dict(name="rt_ssc", num_groups=1, format="SSC", input_size=[None, None, 2]),
    # B between other dimensions in memory, with a runtime size outside it (T, B, C fastest
    # last): the observations are C apart, not an observation's element count
    "cbt_row": dict(name="rt_cbt_row", num_groups=2, format="CBT", layout="row-major",
                    input_size=[6, None]),
    "sbc_col": dict(name="rt_sbc_col", num_groups=4, format="SBC", input_size=[{"max": 9}, 8]),
}


def _layer(key):
    return make_layer(**LAYERS[key])


# --------------------------------------------------------------------------- the spec


def test_runtime_entries_parse_with_names_by_label_and_rank():
    layer = _layer("sscb")
    assert layer.runtime_sizes == (RuntimeSize("s1"), RuntimeSize("s2", 12))
    assert layer.fixed_numel == 4
    assert layer.at_sizes((5, 12)).observation_numel == 240
    assert [r.name for r in make_layer(num_groups=1, format="UTCUB",
                                       input_size=[None, None, 2, None]).runtime_sizes] == \
        ["u1", "t", "u2"]
    with pytest.raises(TypeError, match="runtime sizes"):
        layer.observation_numel


@pytest.mark.parametrize("size,field,words", [
    ([4, 8, None], "input_size[2]", "channel count must be fixed"),
    ([4, 8, {"max": 8}], "input_size[2]", "channel count must be fixed"),
    ([{"min": 2}, 4, 8], "input_size[0]", "null (any size) or {max: N}"),
    ([{"max": 4, "step": 2}, 4, 8], "input_size[0]", "null (any size) or {max: N}"),
    ([{"max": 0}, 4, 8], "input_size[0].max", "at least 1"),
    ([{"max": "big"}, 4, 8], "input_size[0].max", "must be an integer"),
    ([{"max": 2**40}, 4, 8], "input_size[0].max", "at most"),
])
def test_bad_runtime_entries_are_refused_naming_the_field(size, field, words):
    with pytest.raises(SpecError) as err:
        make_layer(num_groups=2, format="SSCB", input_size=size)
    text = str(err.value)
    assert text.startswith(f"{field}: ") and words in text, text


def test_verification_sizes_take_one_odd_and_each_bound():
    assert verification_sizes(_layer("sscb")) == [(1, 1), (7, 7), (1, 12), (37, 1)]
    assert verification_sizes(_layer("bssc")) == [(1,), (7,), (9,)]
    assert verification_sizes(make_layer(num_groups=1, format="SCB",
                                         input_size=[{"max": 3}, 2])) == [(1,), (3,)]


# --------------------------------------------------------------------------- generated C


def test_header_declares_sizes_after_batch_and_their_bounds():
    header, source = render_c(lower(_layer("sscb")), "rt.yaml")
    h = header.text
    assert "int rt_sscb_predict(const float *x, float *y, size_t batch, size_t s1, size_t s2);" in h
    assert ("int rt_sscb_predict_with_params(const float *x, float *y, size_t batch, size_t s1, "
            "size_t s2,\n    const float *scale, const float *offset);") in h
    assert "#define RT_SSCB_MAX_S2 12\n" in h and "MAX_S1" not in h
    assert "#define RT_SSCB_ERR_SIZE (-3)" in h and "OBSERVATION_NUMEL" not in h
    assert "#define RT_SSCB_FIXED_NUMEL 4\n" in h
    # The fixed-size header has neither.
    fixed = render_c(lower(make_layer(num_groups=2, format="SSCB", input_size=[3, 5, 4])),
                     "f.yaml")[0].text
    assert "ERR_SIZE" not in fixed and "#define T_OBSERVATION_NUMEL 60\n" in fixed


@pytest.mark.parametrize("build", list(BUILDS))
@pytest.mark.parametrize("key", list(LAYERS))
def test_runtime_layer_matches_reference_at_every_verified_size(key, build):
    """Every case (random, batch, in place, constant groups, mean 1e4, the caller's
    parameters) at 1, an odd size and each bound, in each host build; -Os compiles the
    compact nest."""
    layer = _layer(key)
    (plan,), module = build_layers(layer, flags=BUILDS[build])
    report = verify_layer(layer, "c", build, c_runner(plan, module))
    assert report.passed, [(c.case, c.max_rel) for c in report.cases if not c.passed]
    sizes_seen = {c.case.rsplit(", ", 1)[1] for c in report.cases}
    assert len(sizes_seen) == len(verification_sizes(layer)) >= 2


def test_sizes_out_of_range_are_refused_and_write_nothing():
    layer = _layer("sscb")
    (plan,), module = build_layers(layer)
    ffi, lib = module.ffi, module.lib
    x = np.ones(4 * 12 * 12, dtype=np.float32)
    y = np.full_like(x, np.nan)
    px, py = ffi.from_buffer("float[]", x), ffi.from_buffer("float[]", y)
    assert lib.rt_sscb_predict(px, py, 1, 0, 3) == -3            # s1 = 0
    assert lib.rt_sscb_predict(px, py, 1, 3, 0) == -3            # s2 = 0
    assert lib.rt_sscb_predict(px, py, 1, 3, 13) == -3           # s2 above its bound
    assert lib.rt_sscb_predict(px, py, 1, 2**63, 12) == -3       # the count overflows size_t
    assert lib.rt_sscb_predict(px, py, 2**62, 3, 12) == -2       # batch * count overflows
    assert np.isnan(y).all()
    assert lib.rt_sscb_predict(px, py, 1, 3, 12) == 0
    assert not np.isnan(y[:4 * 36]).any() and np.isnan(y[4 * 36:]).all()


def test_runtime_layer_at_sizes_equals_the_fixed_layer():
    """The runtime build at sizes (s1, s2) and the fixed build of the same sizes agree to the
    tolerance on the same input (they are different kernels: the fixed one may be runs)."""
    layer = _layer("sscb")
    fixed = make_layer(**{**LAYERS["sscb"], "name": "fx_sscb", "input_size": [9, 12, 4]})
    (rplan, fplan), module = build_layers(layer, fixed)
    x = round_to_dtype(np.random.default_rng(3).normal(2.0, 3.0, 2 * 9 * 12 * 4), "single")
    y_rt = c_runner(rplan, module)(Case("x", x, 2, sizes=(9, 12)))
    y_fx = c_runner(fplan, module)(Case("x", x, 2))
    assert np.max(np.abs(y_rt - y_fx)) <= 4 * DTYPES["single"].tolerance * np.max(np.abs(y_fx))


@pytest.mark.slow
@pytest.mark.parametrize("build", ["O2", "Os"])
def test_a_large_runtime_group_stays_accurate(build):
    """A group of 2^18 elements given at run time, on the classes long sums get wrong (mean
    1e4 std 1, an outlier first), under a tenth of the single tolerance."""
    layer = make_layer(name="rt_long", num_groups=1, format="CBT", input_size=[4, None])
    (plan,), module = build_layers(layer, flags=BUILDS[build])
    run = c_runner(plan, module)
    t = 2**16
    fixed = layer.at_sizes((t,))
    rng = np.random.default_rng(7)
    cases = []
    for name, values in (("mean 1e4", rng.normal(1e4, 1.0, 4 * t)),
                         ("outlier first", np.concatenate([[3e4], rng.normal(0, 1, 4 * t - 1)])),
                         ("normal", rng.normal(0, 1, 4 * t))):
        x = to_flat(from_canonical(round_to_dtype(values, "single").reshape(1, 1, -1), fixed, 1),
                    fixed)
        cases.append(Case(name, x, 1, sizes=(t,)))
    report = verify_layer(layer, "c", build, run, cases)
    assert report.passed and report.max_rel <= DTYPES["single"].tolerance / 10, \
        [(c.case, c.max_rel) for c in report.cases]


# --------------------------------------------------------------------------- targets


@pytest.mark.parametrize("target", ["cortex-m4", "cortex-m0", "riscv32"])
def test_runtime_layers_verify_on_firmware_at_both_levels(target):
    from gncodegen.targets import firmware as fw
    board = fw.BOARDS[target]
    for key in ("sscb", "cbt", "bssc"):
        plan = lower(_layer(key))
        for opt in board.verified_opts:
            run = fw.verify_layer_on(board, plan, list(render_c(plan, "rt.yaml")), opt=opt)
            assert run.report.passed, (key, opt, [(c.case, c.max_rel)
                                                  for c in run.report.cases if not c.passed])


def test_firmware_footprint_gives_buffers_at_the_bound(tmp_path):
    """A bounded layer's footprint row gives x and y at the bound; an unbounded one says it
    cannot (-)."""
    from click.testing import CliRunner

    from gncodegen.cli import main
    import json
    spec = tmp_path / "fw.yaml"
    spec.write_text("layers:\n"
                    "  - {name: bounded, num_groups: 2, format: CBT, input_size: [4, {max: 50}]}\n"
                    "  - {name: unbounded, num_groups: 2, format: CBT, input_size: [4, ~]}\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["build", str(spec), "--target", "cortex-m4",
                                       "-o", str(out)])
    assert result.exit_code == 0, result.output
    fp = json.loads((out / "manifest.json").read_text())["cortex-m4"]["footprint"]
    assert fp["bounded"]["buffer_bytes_per_observation"] == 2 * 4 * 50 * 4
    assert fp["unbounded"]["buffer_bytes_per_observation"] is None
    assert fp["bounded"]["budget"] == {"text": 512, "stack": 96}
    row = next(ln for ln in result.output.splitlines() if ln.startswith("unbounded ")
               and "cortex-m4  -Os" in ln)
    assert "  -  " in row


def test_cli_builds_runtime_layers_on_every_target(tmp_path):
    spec = tmp_path / "rt.yaml"
    spec.write_text("name: rt\nnum_groups: 2\nformat: CBT\ninput_size: [4, {max: 64}]\n")
    done = subprocess.run([sys.executable, "-m", "gncodegen", "build", str(spec), "--target",
                           "all", "-o", str(tmp_path / "out")], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    for target in ("c", "cuda"):
        assert re.search(rf"rt\s+{target}\s+\S.*yes\s+\S+\s+1e-05\s+pass", done.stdout), \
            done.stdout
    header = (tmp_path / "out" / "rt_cuda.h").read_text()
    assert ("cudaError_t rt_cuda_predict(const float *x, float *y, size_t batch, size_t t, "
            "cudaStream_t stream);") in header
    assert "#define RT_CUDA_MAX_T 64\n" in header and "OBSERVATION_NUMEL" not in header


# --------------------------------------------------------------------------- CUDA


CUDA_LAYERS = {
    **{k: LAYERS[k] for k in ("sscb", "cbt", "bssc", "scb_row", "double", "ssc", "cbt_row",
                              "sbc_col")},
    "half": dict(name="rt_half", num_groups=2, format="BSSC", layout="row-major",
                 input_size=[None, 3, 8], dtype="half"),
    "bfloat16": dict(name="rt_bf16", num_groups=4, format="SSCB", input_size=[5, None, 8],
                     dtype="bfloat16"),
}


@pytest.mark.parametrize("key", list(CUDA_LAYERS))
def test_cuda_runtime_layer_matches_reference_under_emulation(key):
    """The generated .cu, compiled unchanged against the host emulation: every case at every
    verified size, each dtype (half and bfloat16 accumulate in float)."""
    from gncodegen.targets.cuda.lower import CudaRuntimePlan, lower_cuda
    from gncodegen.targets.cuda.render import render_cuda
    from gncodegen.targets.cuda.runner import build_harness, cuda_runner
    layer = make_layer(**CUDA_LAYERS[key])
    plan = lower(layer)
    cp = lower_cuda(plan)
    assert isinstance(cp, CudaRuntimePlan)
    exe = build_harness(plan, cp, list(render_cuda(plan, "rt.yaml", cuda_plan=cp)))
    report = verify_layer(layer, "cuda", "emulation", cuda_runner(plan, exe))
    assert report.passed, [(c.case, c.max_rel) for c in report.cases if not c.passed]


def test_cuda_runtime_sizes_out_of_range_are_refused():
    from gncodegen.targets.cuda.lower import lower_cuda
    from gncodegen.targets.cuda.render import render_cuda
    from gncodegen.targets.cuda.runner import build_harness, run_call
    layer = _layer("sscb")
    plan = lower(layer)
    cp = lower_cuda(plan)
    exe = build_harness(plan, cp, list(render_cuda(plan, "rt.yaml", cuda_plan=cp)))
    res = run_call(exe, plan, "errors", 1, np.zeros(4 * 3 * 2, dtype=np.float32), sizes=(3, 2))
    codes = dict(line.split() for line in res.stdout.splitlines())
    invalid = codes.pop("invalid_value")
    assert codes.pop("zero_batch") == "0"
    assert codes == {k: invalid for k in ("null_x", "null_y", "null_scale", "null_offset",
                                          "bad_batch", "zero_s1", "zero_s2", "above_s2")}


def test_cuda_runtime_kernel_compiles_with_nvcc_without_spills():
    from gncodegen.targets.cuda.lower import lower_cuda
    from gncodegen.targets.cuda.render import render_cuda
    from gncodegen.targets.cuda.runner import compile_check
    for key in ("sscb", "double", "half"):
        plan = lower(make_layer(**CUDA_LAYERS[key]))
        cp = lower_cuda(plan)
        resources = compile_check(plan, cp, list(render_cuda(plan, "rt.yaml", cuda_plan=cp)))
        assert resources and all(r.spill_stores == r.spill_loads == 0 for r in resources)
