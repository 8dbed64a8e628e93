"""Fused activations (MATLAB's activation layers after the normalization): the spec rules,
the float64 reference against PyTorch's functions, and every kind verified on the host C
(each build), the CUDA emulation (every dtype) and the firmware cores, with what each costs
there.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from gncodegen.activations import Activation
from gncodegen.cli import main
from gncodegen.errors import SpecError
from gncodegen.plan import lower
from gncodegen.reference import canonical, group_norm_reference, to_logical
from gncodegen.targets.c import render_c
from gncodegen.targets.c.runner import c_runner
from gncodegen.verify import make_cases, verify_layer

from conftest import build_layers, make_layer
from test_c_kernels import BUILDS

KINDS = {
    "relu": "reluLayer",
    "leaky-relu": {"type": "leaky-relu", "Scale": 0.2},
    "clipped-relu": {"type": "clippedReluLayer", "ceiling": 2.5},
    "elu": {"type": "elu", "alpha": 0.7},
    "gelu": "gelu",
    "gelu-tanh": {"type": "geluLayer", "Approximation": "tanh"},
    "swish": "swishLayer",
    "sigmoid": "sigmoid",
    "tanh": "tanhLayer",
}
# One layer shape per C kernel kind: runs (SSCB), rows (channels last), strided (SCB
# row-major); and a runtime size.
SHAPES = {
    "runs": dict(format="SSCB", input_size=[5, 4, 6], num_groups=2),
    "rows": dict(format="BSSC", layout="row-major", input_size=[4, 3, 8], num_groups=2),
    "strided": dict(format="SCB", layout="row-major", input_size=[7, 4], num_groups=2),
    "runtime": dict(format="CBT", input_size=[6, {"max": 20}], num_groups=3),
}


def _layer(kind: str, shape: str, **extra):
    return make_layer(name=f"act_{kind.replace('-', '_')}_{shape}", activation=KINDS[kind],
                      **SHAPES[shape], **extra)


# --------------------------------------------------------------------------- the spec


def test_names_aliases_and_properties():
    assert _layer("relu", "runs").activation == Activation("relu")
    assert _layer("leaky-relu", "runs").activation == Activation("leaky-relu", scale=0.2)
    assert make_layer(num_groups=2, format="SSCB", input_size=[2, 2, 4],
                      activation={"type": "leakyReluLayer"}).activation.scale == 0.01
    assert _layer("gelu", "runs").activation.approximation == "none"
    assert make_layer(num_groups=2, format="SSCB", input_size=[2, 2, 4],
                      Activation="silu").activation.kind == "swish"
    assert make_layer(num_groups=2, format="SSCB", input_size=[2, 2, 4]).activation.kind == "none"


@pytest.mark.parametrize("value,field,words", [
    ("softplus", "activation", "is not an activation"),
    ({"type": "clipped-relu"}, "activation.ceiling", "needs its ceiling"),
    ({"type": "clipped-relu", "ceiling": -1}, "activation.ceiling", "non-negative"),
    ({"type": "clipped-relu", "ceiling": 0}, "activation.ceiling", "must be positive"),
    ({"type": "relu", "scale": 2}, "activation.scale", "relu takes no properties"),
    ({"type": "elu", "ceiling": 2}, "activation.ceiling", "elu takes alpha"),
    ({"type": "gelu", "approximation": "fast"}, "activation.approximation", "none or tanh"),
    ({"scale": 0.1}, "activation", "a mapping needs `type`"),
    (3, "activation", "is not an activation"),
])
def test_bad_activations_are_refused_naming_the_field(value, field, words):
    with pytest.raises(SpecError) as err:
        make_layer(num_groups=2, format="SSCB", input_size=[2, 2, 4], activation=value)
    assert str(err.value).startswith(f"{field}: ") and words in str(err.value), str(err.value)


@pytest.mark.parametrize("kind", list(KINDS))
def test_reference_matches_pytorch_activation_after_group_norm(kind):
    import torch
    import torch.nn.functional as F

    layer = _layer(kind, "runs")
    act = layer.activation
    fns = {"relu": F.relu, "leaky-relu": lambda t: F.leaky_relu(t, act.scale),
           "clipped-relu": lambda t: torch.clamp(t, 0.0, act.ceiling),
           "elu": lambda t: F.elu(t, act.alpha), "gelu": lambda t: F.gelu(t),
           "gelu-tanh": lambda t: F.gelu(t, approximate="tanh"), "swish": F.silu,
           "sigmoid": torch.sigmoid, "tanh": torch.tanh}
    x = np.random.default_rng(1).normal(0.0, 1.0, 2 * layer.observation_numel)
    scale = np.random.default_rng(2).uniform(3.0, 8.0, layer.num_channels)
    offset = np.random.default_rng(3).normal(0.0, 4.0, layer.num_channels)
    ours = group_norm_reference(x, layer, 2, scale, offset)
    canon = torch.from_numpy(canonical(to_logical(x, layer, 2), layer).copy())
    theirs = fns[kind](F.group_norm(canon, layer.num_groups, torch.from_numpy(scale),
                                    torch.from_numpy(offset), layer.epsilon)).numpy()
    want = canonical(to_logical(ours, layer, 2), layer)
    assert np.max(np.abs(want - theirs)) <= 1e-12 * max(1.0, np.max(np.abs(theirs)))


def test_nan_stays_nan_through_every_activation():
    z = np.array([np.nan, -np.inf, np.inf, -40.0, 0.0, 40.0])
    for kind in KINDS:
        out = _layer(kind, "runs").activation.apply(z)
        assert np.isnan(out[0]), kind


def test_verification_exercises_the_activation_regions():
    layer = _layer("clipped-relu", "runs")
    case = next(c for c in make_cases(layer) if c.name == "activation regions")
    z = group_norm_reference(case.x, layer, case.batch, case.scale, case.offset)
    assert (z == 0).any() and (z == layer.activation.ceiling).any() and \
        ((z > 0) & (z < layer.activation.ceiling)).any()
    assert "activation regions" not in [c.name for c in make_cases(
        make_layer(num_groups=2, format="SSCB", input_size=[5, 4, 6]))]


# --------------------------------------------------------------------------- targets


@pytest.mark.parametrize("build", list(BUILDS))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_c_every_activation_matches_reference(shape, build):
    layers = [_layer(kind, shape) for kind in KINDS]
    plans, module = build_layers(*layers, flags=BUILDS[build])
    for layer, plan in zip(layers, plans):
        report = verify_layer(layer, "c", build, c_runner(plan, module))
        assert report.passed, (layer.activation.kind, [(c.case, c.max_rel)
                                                       for c in report.cases if not c.passed])


def test_c_double_activations_match_reference():
    layers = [_layer(kind, "runs", dtype="double", epsilon=1e-6) for kind in KINDS]
    plans, module = build_layers(*layers)
    for layer, plan in zip(layers, plans):
        assert verify_layer(layer, "c", "O2", c_runner(plan, module)).passed, layer.name


@pytest.mark.parametrize("dtype", ["single", "double", "half", "bfloat16"])
@pytest.mark.parametrize("kind", ["relu", "clipped-relu", "gelu", "swish", "tanh"])
def test_cuda_activation_matches_reference_under_emulation(kind, dtype):
    from gncodegen.targets.cuda.lower import lower_cuda
    from gncodegen.targets.cuda.render import render_cuda
    from gncodegen.targets.cuda.runner import build_harness, cuda_runner
    for shape in ("runs", "rows", "runtime"):
        layer = _layer(kind, shape, dtype=dtype)
        plan = lower(layer)
        cp = lower_cuda(plan)
        exe = build_harness(plan, cp, list(render_cuda(plan, "act.yaml", cuda_plan=cp)))
        report = verify_layer(layer, "cuda", "emulation", cuda_runner(plan, exe))
        assert report.passed, (shape, [(c.case, c.max_rel) for c in report.cases
                                       if not c.passed])


@pytest.mark.parametrize("target", ["cortex-m4", "cortex-m0"])
def test_firmware_activations_verify_and_name_their_calls(tmp_path, target):
    """Every kind on the core at both levels; the footprint names the math function each
    calls (and none for the piecewise ones), within the budget the activation allows."""
    spec = tmp_path / "act.yaml"
    entries = []
    for kind, value in KINDS.items():
        entries.append({"name": f"fw_{kind.replace('-', '_')}", "activation": value,
                        **SHAPES["runs"]})
    import yaml
    spec.write_text(yaml.safe_dump({"layers": entries}))
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["build", str(spec), "--target", target, "-o", str(out)])
    assert result.exit_code == 0, result.output
    fp = json.loads((out / "manifest.json").read_text())[target]["footprint"]
    # Single precision calls no math function for any activation: e^x and erf are the
    # source's own (the float helpers on a core without an FPU).
    for name, v in fp.items():
        assert {s for s in v["calls"] if not s.startswith("__aeabi_")} <= {"sqrtf"}, name
    if target == "cortex-m4":
        assert fp["fw_relu"]["budget"] == {"text": 448, "stack": 112}
        assert fp["fw_swish"]["budget"] == {"text": 784, "stack": 160}


def test_double_activations_name_the_math_functions_they_call():
    from gncodegen.targets import firmware as fw
    for kind, expected in (("elu", {"expm1"}), ("swish", {"exp"}), ("gelu", {"erf"}),
                           ("tanh", {"tanh"}), ("relu", set())):
        layer = _layer(kind, "runs", dtype="double", epsilon=1e-6)
        plan = lower(layer)
        run = fw.verify_layer_on(fw.BOARDS["cortex-m7"], plan, list(render_c(plan, "a.yaml")))
        assert run.report.passed
        assert set(run.footprint.calls) - {"sqrt"} == expected, (kind, run.footprint.calls)


def test_matlab_example_with_relu_fits_its_budget():
    """The MATLAB page's GN + ReLU on the Cortex-M4 at -Os: the comparison costs a few bytes."""
    from gncodegen.targets.firmware.footprint import measure_footprint
    from gncodegen.targets.firmware.boards import BOARDS
    from conftest import EXAMPLES
    from gncodegen.pipeline import load_spec

    layer = load_spec(EXAMPLES / "matlab_gn_relu.yaml").layers[0]
    plan = lower(layer)
    header, source = render_c(plan, "matlab_gn_relu.yaml")
    fp = measure_footprint(plan, source, header, BOARDS["cortex-m4"])
    assert fp.text <= 448 and fp.stack <= 112 and fp.calls == ()

