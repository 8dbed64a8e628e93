"""The CUDA training entry points under the host emulation (one host thread per CUDA thread):
forward_train, backward and the three updates of every dtype, layout, fusion and runtime size
against the float64 reference, the refused calls, and a wrong value failing. nvcc compiles
the same sources without warnings where it is installed."""

from __future__ import annotations

import shutil
from dataclasses import replace

import numpy as np
import pytest

from gncodegen.pipeline import parse_spec
from gncodegen.plan import lower
from gncodegen.targets.cuda.lower import lower_cuda
from gncodegen.targets.cuda.render import render_cuda
from gncodegen.targets.cuda.runner import (build_harness, compile_check, cuda_train_refusals,
                                           cuda_train_runners, train_harness_source)
from gncodegen.training import reference_backward
from gncodegen.verify_train import train_cases, verify_training

from conftest import REPO

# name: (format, layout, input_size, groups, extra spec lines)
LAYERS = {
    "sscb": ("SSCB", "column-major", [5, 3, 8], 4, ""),
    "nchw": ("BCSS", "row-major", [6, 4, 5], 3, ""),
    "nhwc_fused": ("BSSC", "row-major", [4, 3, 6], 2,
                   "activation: swish\nskip: true\nadaptive: true\n"),
    "cbt_runtime": ("CBT", "column-major", [6, {"max": 9}], 3,
                    "activation: gelu\nScaleLearnRateFactor: 0\nOffsetL2Factor: 0.5\n"),
    "cb_channelwise": ("CB", "column-major", [8], 8,
                       "activation: {type: clipped-relu, ceiling: 1}\n"),
    "ssc_no_batch": ("SSC", "column-major", [4, 5, 6], 2, "activation: relu\n"),
}


def _layer(key: str, dtype: str = "single"):
    fmt, layout, size, groups, extra = LAYERS[key]
    text = (f"name: tr_{key}\nnum_groups: {groups}\nformat: {fmt}\nlayout: {layout}\n"
            f"input_size: {size}\ndtype: {dtype}\ntraining: true\n"
            f"scale_initializer: narrow-normal\noffset_initializer: narrow-normal\n{extra}")
    return parse_spec(text, base_dir=REPO, stem=f"tr_{key}").layers[0]


def _driver(key: str, dtype: str = "single"):
    plan = lower(_layer(key, dtype))
    cp = lower_cuda(plan)
    sources = list(render_cuda(plan, "test.yaml", cuda_plan=cp))
    exe = build_harness(plan, cp, sources, "emulation", harness=train_harness_source(plan, cp))
    return plan, cp, sources, exe


@pytest.mark.parametrize("key", list(LAYERS))
def test_training_single_every_layout_and_fusion(key):
    plan, _, _, exe = _driver(key)
    run, solve = cuda_train_runners(plan, exe)
    results = verify_training(plan.layer, run, solve)
    failed = [r for r in results if not r.passed]
    assert results and not failed, failed
    names = {r.case for r in results}
    assert any(n.endswith(": dx") for n in names) and any("adam_update" in n for n in names)
    if plan.layer.skip:
        assert any(n.endswith(": sum") for n in names)
    if plan.layer.adaptive:
        assert any(n.endswith(": dada_scale") for n in names)


@pytest.mark.parametrize("dtype", ["double", "half", "bfloat16"])
@pytest.mark.parametrize("key", ["sscb", "nhwc_fused"])
def test_training_every_dtype(key, dtype):
    plan, _, _, exe = _driver(key, dtype)
    run, solve = cuda_train_runners(plan, exe)
    results = verify_training(plan.layer, run, solve)
    assert all(r.passed for r in results), [r for r in results if not r.passed]


def test_refused_calls():
    plan, _, _, exe = _driver("nhwc_fused")
    case = next(iter(train_cases(plan.layer)))
    result = cuda_train_refusals(plan, exe, case)
    assert result.passed, result


def test_a_wrong_gradient_fails():
    """The comparison can fail: a driver whose dscale is off by one part in 1e4 is caught."""
    plan, _, _, exe = _driver("sscb")
    run, solve = cuda_train_runners(plan, exe)

    def off(tc):
        out = run(tc)
        return replace(out, dscale=out.dscale * np.float32(1 + 1e-4))
    results = verify_training(plan.layer, off, solve, list(train_cases(plan.layer))[:1])
    failed = {r.case for r in results if not r.passed}
    assert failed == {"train: random, batch 1: dscale"}, failed


def test_backward_matches_the_c_target_reference_on_a_larger_group():
    """A group of 2048 elements in 64 channels (several blocks' worth of threads per channel):
    dx and the parameters' gradients within the single-precision tolerance."""
    text = ("name: big\nnum_groups: 2\nformat: BCSS\nlayout: row-major\ninput_size: [64, 8, 4]\n"
            "training: true\n")
    plan = lower(parse_spec(text, base_dir=REPO, stem="big").layers[0])
    cp = lower_cuda(plan)
    sources = list(render_cuda(plan, "test.yaml", cuda_plan=cp))
    exe = build_harness(plan, cp, sources, "emulation", harness=train_harness_source(plan, cp))
    run, _ = cuda_train_runners(plan, exe)
    tc = next(iter(train_cases(plan.layer)))
    out = run(tc)
    ref = reference_backward(plan.layer, tc.case.x, tc.dy, tc.case.batch, tc.case.scale,
                             tc.case.offset)
    for key in ("dx", "dscale", "doffset"):
        got = np.asarray(getattr(out, key), dtype=np.float64)
        assert np.max(np.abs(got - ref[key])) <= 1e-5 * np.max(np.abs(ref[key])), key


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
@pytest.mark.parametrize("key", ["sscb", "nhwc_fused", "cbt_runtime"])
def test_nvcc_compiles_the_training_kernels_without_spills(key):
    plan, cp, sources, _ = _driver(key)
    kernels = compile_check(plan, cp, sources)
    names = {k.kernel for k in kernels}
    assert any("backward_dx_kernel" in n for n in names), names
    assert any("backward_params_kernel" in n for n in names), names
    assert all(k.spill_stores == 0 and k.spill_loads == 0 for k in kernels), kernels


@pytest.mark.parametrize("dtype", ["half", "bfloat16"])
def test_an_update_that_leaves_a_parameter_fails_in_every_dtype(dtype):
    """The solver checks can fail at the widest tolerances: each update moves the parameters
    by more than bfloat16's 5e-2, so an update that skipped scale or offset is caught."""
    plan, _, _, exe = _driver("sscb", dtype)
    run, solve = cuda_train_runners(plan, exe)
    cases = list(train_cases(plan.layer))[:1]
    for key in ("scale", "offset"):
        def lazy(s, key=key):
            out = solve(s)
            out[key] = getattr(s, key).copy()
            return out
        failed = {r.case for r in verify_training(plan.layer, run, lazy, cases) if not r.passed}
        assert failed == {f"train: {solver}_update: {key}" for solver in ("sgdm", "adam",
                                                                          "rmsprop")}, failed
