"""The skip and the modulation fused around the normalization (a diffusion block's residual add
and its per-sample scale and shift): the spec rules, the float64 reference against PyTorch's
separate ops, the entry points' contract, and every kernel kind verified on the host C (each
build), the CUDA emulation (every strategy and dtype) and the firmware cores.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from gncodegen.cli import main
from gncodegen.errors import SpecError
from gncodegen.plan import lower
from gncodegen.reference import (canonical, from_canonical, group_norm_reference, to_flat,
                                 to_logical)
from gncodegen.targets.c import render_c
from gncodegen.targets.c.runner import c_runner
from gncodegen.verify import Case, make_cases, verify_layer

from conftest import build_layers, make_layer, small_cuda_geometry
from test_c_kernels import BUILDS

# One shape per C kernel kind: runs (NCHW), rows (channels last), strided (batch fastest), a
# channels-last layer whose groups are one job each (runs with channels fastest), runtime sizes.
SHAPES = {
    "runs": dict(format="BCSS", layout="row-major", input_size=[6, 7, 5], num_groups=3),
    "rows": dict(format="BSSC", layout="row-major", input_size=[5, 3, 12], num_groups=4),
    "strided": dict(format="SSCB", layout="row-major", input_size=[4, 5, 6], num_groups=3),
    "channels_fastest": dict(format="BSSC", layout="row-major", input_size=[4, 3, 8],
                             num_groups=1),
    "runtime": dict(format="CBT", input_size=[6, {"max": 20}], num_groups=3),
}
FUSIONS = {
    "skip": dict(skip=True),
    "adaptive": dict(adaptive=True),
    "diffusion": dict(skip=True, adaptive=True, activation="swish"),
}


def _layer(shape: str, fusion: str, **extra):
    extra.setdefault("name", f"fu_{fusion}_{shape}")
    return make_layer(**SHAPES[shape], **FUSIONS[fusion], **extra)


# --------------------------------------------------------------------------- the spec


def test_keys_and_aliases():
    layer = make_layer(num_groups=2, format="SSCB", input_size=[2, 2, 4], Skip=True,
                       Adaptive=True)
    assert layer.skip and layer.adaptive and layer.fused
    assert layer.fusion_args == ("skip", "sum", "ada_scale", "ada_shift")
    plain = make_layer(num_groups=2, format="SSCB", input_size=[2, 2, 4])
    assert not plain.skip and not plain.adaptive and plain.fusion_args == () and not plain.fused
    assert make_layer(num_groups=2, format="SSCB", input_size=[2, 2, 4],
                      adaptive=True).fusion_args == ("ada_scale", "ada_shift")


@pytest.mark.parametrize("key,value", [("skip", "yes"), ("skip", 1), ("adaptive", "true"),
                                       ("adaptive", None)])
def test_bad_switches_are_refused_naming_the_field(key, value):
    with pytest.raises(SpecError) as err:
        make_layer(num_groups=2, format="SSCB", input_size=[2, 2, 4], **{key: value})
    assert str(err.value).startswith(f"{key}: must be true or false"), str(err.value)


def test_cli_refuses_a_bad_switch_in_one_line(tmp_path):
    spec = tmp_path / "bad.yaml"
    spec.write_text("num_groups: 2\nformat: SSCB\ninput_size: [2, 2, 4]\nskip: 'on'\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["build", str(spec), "-o", str(out)])
    assert result.exit_code != 0 and not out.exists()
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "skip: must be true or false" in lines[0], result.output


# --------------------------------------------------------------------------- the reference


@pytest.mark.parametrize("shape", ["runs", "rows", "strided"])
def test_reference_matches_pytorch_add_group_norm_modulate_silu(shape):
    """x + skip, group_norm, z*(1 + s[n, c]) + h[n, c], SiLU, as four PyTorch ops."""
    import torch
    import torch.nn.functional as F

    layer = _layer(shape, "diffusion", dtype="double")
    batch, c = 3, layer.num_channels
    rng = np.random.default_rng(4)
    x, skip = (rng.normal(0.0, 1.0, batch * layer.observation_numel) for _ in range(2))
    scale, offset = rng.normal(1.0, 0.3, c), rng.normal(0.0, 0.3, c)
    gain, shift = rng.normal(0.0, 0.5, batch * c), rng.normal(0.0, 0.5, batch * c)
    ours = group_norm_reference(x, layer, batch, scale, offset, skip=skip, ada_scale=gain,
                                ada_shift=shift)

    def canon(v):
        return torch.from_numpy(np.ascontiguousarray(canonical(to_logical(v, layer, batch),
                                                               layer)))
    z = F.group_norm(canon(x) + canon(skip), layer.num_groups, torch.from_numpy(scale),
                     torch.from_numpy(offset), layer.epsilon)
    g = torch.from_numpy(gain).reshape(batch, c, 1)
    h = torch.from_numpy(shift).reshape(batch, c, 1)
    theirs = F.silu(z * (1 + g) + h).numpy()
    theirs = to_flat(from_canonical(theirs, layer, batch), layer)
    assert np.max(np.abs(ours - theirs)) <= 1e-12 * max(1.0, np.max(np.abs(theirs)))


def test_verification_covers_the_sum_and_its_absence():
    layer = _layer("runs", "diffusion")
    cases = make_cases(layer)
    names = [c.name for c in cases]
    assert "skip without sum" in names and "skip without sum, in place" in names
    assert all(c.skip is not None and c.ada_scale is not None for c in cases)
    assert sum(c.want_sum for c in cases) == len(cases) - 2
    # every observation has its own modulation
    case = next(c for c in cases if c.batch > 1)
    rows = case.ada_scale.reshape(case.batch, layer.num_channels)
    assert len({tuple(r) for r in rows}) == case.batch
    # a constant group stays constant through the skip
    const = next(c for c in cases if c.name == "constant groups")
    total = to_logical(const.x.astype(np.float64) + const.skip, layer, const.batch)
    assert np.ptp(total[0, :layer.channels_per_group]) == 0


# --------------------------------------------------------------------------- C


@pytest.mark.parametrize("build", list(BUILDS))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_c_every_fusion_matches_reference(shape, build):
    layers = [_layer(shape, fusion) for fusion in FUSIONS]
    plans, module = build_layers(*layers, flags=BUILDS[build])
    for layer, plan in zip(layers, plans):
        report = verify_layer(layer, "c", build, c_runner(plan, module))
        assert report.passed, (layer.name, [(c.case, c.max_rel)
                                            for c in report.cases if not c.passed])
        assert any(c.case.endswith(": sum") for c in report.cases) == layer.skip


def test_c_double_and_threads():
    layers = [_layer("runs", "diffusion", dtype="double", epsilon=1e-6, name="fu_double"),
              _layer("rows", "diffusion", threads=2, name="fu_rows_t2"),
              _layer("runs", "diffusion", threads=2, name="fu_runs_t2")]
    plans, module = build_layers(*layers)
    for layer, plan in zip(layers, plans):
        assert verify_layer(layer, "c", "O2", c_runner(plan, module)).passed, layer.name


def test_c_scale_too_large_to_fold_takes_the_portable_nest_with_the_fusions():
    """A scale that would overflow scale*rstd sends every group through the portable nest:
    it must add the skip and modulate too."""
    layer = _layer("rows", "diffusion", epsilon=1e-6)
    plans, module = build_layers(layer)
    base = next(c for c in make_cases(layer) if c.name == "caller's scale and offset")
    big = base.scale.copy()
    big[0] = np.float32(3e37)
    report = verify_layer(layer, "c", "O2", c_runner(plans[0], module),
                          [Case("huge scale", base.x, base.batch, scale=big, offset=base.offset,
                                skip=base.skip, want_sum=True, ada_scale=base.ada_scale,
                                ada_shift=base.ada_shift)])
    assert report.passed, report


@pytest.mark.parametrize("shape", ["runs", "rows"])
def test_c_a_gain_that_would_overflow_the_folded_scale_takes_the_portable_nest(shape):
    """scale below the safe limit, but scale * (1 + ada_scale) * rstd beyond the largest float:
    the folded a would overflow; the check counts the gain and the portable nest gets it right."""
    layer = _layer(shape, "adaptive", name=f"fu_gain_{shape}")
    plans, module = build_layers(layer)
    base = next(c for c in make_cases(layer) if c.name == "caller's scale and offset")
    scale = np.full(layer.num_channels, 1e35, np.float32)
    x = (base.x.astype(np.float64) * 1e-3).astype(np.float32)
    gain = np.full_like(base.ada_scale, 99.0)
    report = verify_layer(layer, "c", "O2", c_runner(plans[0], module),
                          [Case("folded gain", x, base.batch, scale=scale, offset=base.offset,
                                ada_scale=gain, ada_shift=base.ada_shift)])
    assert report.passed, report


def test_c_contract_null_pointers_and_overlaps():
    layer = _layer("runs", "diffusion")
    plans, module = build_layers(layer)
    ffi, lib = module.ffi, module.lib
    predict = getattr(lib, f"{layer.name}_predict")
    numel, c = layer.observation_numel, layer.num_channels
    rng = np.random.default_rng(7)
    x = rng.normal(size=2 * numel).astype(np.float32)
    skip = rng.normal(size=2 * numel).astype(np.float32)
    gain = rng.normal(0, 0.5, 2 * c).astype(np.float32)
    shift = rng.normal(0, 0.5, 2 * c).astype(np.float32)

    def buf(a):
        return ffi.from_buffer("float[]", a)

    y = np.zeros_like(x)
    null = ffi.NULL
    assert predict(buf(x), buf(y), 2, null, null, buf(gain), buf(shift)) == -1
    assert predict(buf(x), buf(y), 2, buf(skip), null, null, buf(shift)) == -1
    assert predict(buf(x), buf(y), 2, buf(skip), null, buf(gain), null) == -1
    assert not y.any()   # a refused call writes nothing
    ref = group_norm_reference(x, layer, 2, skip=skip, ada_scale=gain, ada_shift=shift)
    tol = 1e-5 * np.max(np.abs(ref))
    assert predict(buf(x), buf(y), 2, buf(skip), null, buf(gain), buf(shift)) == 0
    assert np.max(np.abs(y - ref)) <= tol
    # y == skip, and sum == x: both allowed
    k2, x2 = skip.copy(), x.copy()
    assert predict(buf(x2), buf(k2), 2, buf(k2), buf(x2), buf(gain), buf(shift)) == 0
    assert np.max(np.abs(k2 - ref)) <= tol
    assert np.array_equal(x2, (x.astype(np.float64) + skip).astype(np.float32))


def test_header_documents_the_fusion_arguments():
    plan = lower(_layer("runs", "diffusion"))
    header = render_c(plan, "d.yaml")[0].text
    assert ("int fu_diffusion_runs_predict(const float *x, float *y, size_t batch, "
            "const float *skip, float *sum, const float *ada_scale, const float *ada_shift);"
            in header)
    assert "x, y, scale, offset, skip, ada_scale or ada_shift is NULL" in header
    assert "writes it to sum unless sum is NULL" in header


# --------------------------------------------------------------------------- CUDA

# Shapes of test_cuda that reach every CUDA strategy under the small geometry.
CUDA_SHAPES = {
    "warp": ("SSCB", "column-major", [6, 5, 4], 2),
    "cluster_looped_split": ("SSCB", "column-major", [10, 10, 8], 2),
    "rows": ("BSSC", "row-major", [6, 6, 16], 8),
    "rows_looped": ("BSSC", "row-major", [20, 20, 16], 8),
    "block": ("CBT", "column-major", [6, 70], 3),
    "runtime": ("CBT", "column-major", [6, {"max": 40}], 3),
}


@pytest.mark.parametrize("dtype", ["single", "half"])
@pytest.mark.parametrize("key", list(CUDA_SHAPES))
def test_cuda_fusions_match_reference_under_emulation(key, dtype):
    from gncodegen.targets.cuda.lower import lower_cuda
    from gncodegen.targets.cuda.render import render_cuda
    from gncodegen.targets.cuda.runner import build_harness, cuda_runner

    fmt, layout, size, groups = CUDA_SHAPES[key]
    layer = make_layer(name=f"cu_{key}_{dtype}", format=fmt, layout=layout, input_size=size,
                       num_groups=groups, dtype=dtype, **FUSIONS["diffusion"])
    plan = lower(layer)
    cp = lower_cuda(plan, small_cuda_geometry() if not plan.runtime_sizes else None)
    exe = build_harness(plan, cp, list(render_cuda(plan, "fu.yaml", cuda_plan=cp)))
    envs = [None, {"GN_EMU_CC_MAJOR": "8"}]
    if getattr(cp, "split", None) is not None:
        envs.append({"GN_EMU_CC_MAJOR": "9", "GN_EMU_NO_POOL": "1"})
    for env in envs:
        report = verify_layer(layer, "cuda", f"emulation {env}", cuda_runner(plan, exe, env))
        assert report.passed, (env, [(c.case, c.max_rel) for c in report.cases
                                     if not c.passed])


def test_cuda_refuses_null_fusion_inputs():
    from gncodegen.targets.cuda.lower import lower_cuda
    from gncodegen.targets.cuda.render import render_cuda
    from gncodegen.targets.cuda.runner import build_harness, run_call

    layer = make_layer(name="cu_null", format="SSCB", input_size=[6, 5, 4], num_groups=2,
                       **FUSIONS["diffusion"])
    plan = lower(layer)
    cp = lower_cuda(plan)
    exe = build_harness(plan, cp, list(render_cuda(plan, "fu.yaml", cuda_plan=cp)))
    res = run_call(exe, plan, "errors", 1, np.zeros(layer.observation_numel, np.float32))
    codes = dict(line.split() for line in res.stdout.splitlines())
    bad = codes["invalid_value"]
    assert codes["null_skip"] == codes["null_ada_scale"] == codes["null_ada_shift"] == bad
    assert codes["zero_batch"] == "0"


# --------------------------------------------------------------------------- firmware


@pytest.mark.parametrize("target", ["cortex-m4", "cortex-m0", "riscv32"])
def test_firmware_fusions_verify_within_their_budget(tmp_path, target):
    entries = [{"name": f"fw_{fusion}_{shape}", **SHAPES[shape], **FUSIONS[fusion]}
               for fusion in FUSIONS for shape in ("runs", "rows", "runtime")]
    spec = tmp_path / "fu.yaml"
    spec.write_text(yaml.safe_dump({"layers": entries}))
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["build", str(spec), "--target", target, "-o", str(out)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    fp = manifest[target]["footprint"]
    if target == "cortex-m4":
        assert fp["fw_skip_runs"]["budget"] == {"text": 512, "stack": 112}
        assert fp["fw_adaptive_runs"]["budget"] == {"text": 496, "stack": 128}
    for name, v in fp.items():
        assert {s for s in v["calls"] if not s.startswith("__aeabi_")} <= {"sqrtf"}, name
    if target == "cortex-m4":
        # The generated project's program runs every fused layer and checks its output.
        import subprocess
        run = subprocess.run(["make", "-s", "-C", str(out), "run"], capture_output=True,
                             text=True, timeout=300)
        assert run.returncode == 0 and "all layers ok" in run.stdout + run.stderr, run.stderr
