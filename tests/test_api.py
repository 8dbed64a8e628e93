"""The Python interface: load, compile, and a layer called on arrays of any strides in the
format's order, checked against PyTorch; the checks of dtype, shape and fusion inputs."""

from __future__ import annotations

import numpy as np
import pytest

import gncodegen
from gncodegen import ArgumentError

from conftest import EXAMPLES

torch = pytest.importorskip("torch")


def _trained_spec(**extra):
    torch.manual_seed(0)
    gn = torch.nn.GroupNorm(8, 32)
    with torch.no_grad():
        gn.weight.normal_(1.0, 0.3)
        gn.bias.normal_(0.0, 0.3)
    spec = gncodegen.load({"name": "trained", "num_groups": 8, "format": "BCSS",
                           "layout": "row-major", "input_size": [32, 6, 5],
                           "scale": gn.weight.detach().numpy().tolist(),
                           "offset": gn.bias.detach().numpy().tolist(), **extra})
    return gn, spec


def test_three_lines_from_a_trained_group_norm():
    gn, spec = _trained_spec()
    lib = gncodegen.compile(spec)
    x = torch.randn(3, 32, 6, 5)
    y = lib["trained"](x.numpy())
    assert isinstance(y, np.ndarray) and y.shape == (3, 32, 6, 5) and y.dtype == np.float32
    assert np.max(np.abs(y - gn(x).detach().numpy())) < 2e-5
    assert lib["trained"].verify().passed
    assert list(lib) == ["trained"] and len(lib) == 1


def test_any_strides_give_the_same_answer():
    gn, spec = _trained_spec()
    f = gncodegen.compile(spec)["trained"]
    x = torch.randn(2, 32, 6, 5)
    want = gn(x).detach().numpy()
    channels_last = x.contiguous(memory_format=torch.channels_last).numpy()
    assert not channels_last.flags["C_CONTIGUOUS"]
    assert np.max(np.abs(f(channels_last) - want)) < 2e-5
    strided = np.zeros((2, 64, 6, 5), np.float32)[:, ::2]
    strided[...] = x.numpy()
    assert np.max(np.abs(f(strided) - want)) < 2e-5
    # anything numpy.asarray takes: nested lists are taken in the layer's type
    assert np.max(np.abs(f(x.numpy().tolist()) - want)) < 2e-5


def test_column_major_spec_and_a_file():
    spec = gncodegen.load(EXAMPLES / "matlab_gn.yaml")      # SSCB, column-major: (24, 24, 20, B)
    f = gncodegen.compile(spec)["matlab_gn"]
    x = np.random.default_rng(0).normal(size=(24, 24, 20, 2)).astype(np.float32)
    y = f(x)
    # against PyTorch on the same values in NCHW
    t = torch.from_numpy(np.ascontiguousarray(np.transpose(x, (3, 2, 0, 1))))
    layer = spec.layers[0]
    want = torch.nn.functional.group_norm(t, layer.num_groups, torch.tensor(layer.scale).float(),
                                          torch.tensor(layer.offset).float(), layer.epsilon)
    assert np.max(np.abs(np.transpose(y, (3, 2, 0, 1)) - want.numpy())) < 2e-5


def test_runtime_sizes_come_from_the_shape():
    spec = gncodegen.load({"name": "seq", "num_groups": 2, "format": "CBT",
                           "input_size": [6, {"max": 50}]})
    f = gncodegen.compile(spec)["seq"]
    for t in (1, 7, 50):
        x = np.random.default_rng(t).normal(size=(6, 3, t)).astype(np.float32)
        y = f(x)
        xt = torch.from_numpy(np.ascontiguousarray(np.transpose(x, (1, 0, 2))))
        want = torch.nn.functional.group_norm(xt, 2, None, None, 1e-5).numpy()
        assert np.max(np.abs(np.transpose(y, (1, 0, 2)) - want)) < 2e-5
    with pytest.raises(ArgumentError, match=r"axis 2 \(T\) is 51, the layer takes 1 to 50"):
        f(np.zeros((6, 3, 51), np.float32))


def test_fusion_inputs_and_the_sum():
    _, spec = _trained_spec(skip=True, adaptive=True, activation="swish")
    f = gncodegen.compile(spec)["trained"]
    rng = np.random.default_rng(1)
    x, k = (rng.normal(size=(2, 32, 6, 5)).astype(np.float32) for _ in range(2))
    g, h = (rng.normal(0, 0.5, (2, 32)).astype(np.float32) for _ in range(2))
    y, total = f(x, skip=k, ada_scale=g, ada_shift=h, sum=True)
    assert np.array_equal(total, x + k)
    layer = spec.layers[0]
    t = torch.from_numpy(x + k)
    z = torch.nn.functional.group_norm(t, 8, torch.tensor(layer.scale).float(),
                                       torch.tensor(layer.offset).float(), layer.epsilon)
    want = torch.nn.functional.silu(z * (1 + torch.from_numpy(g)[:, :, None, None])
                                    + torch.from_numpy(h)[:, :, None, None])
    assert np.max(np.abs(y - want.numpy())) < 2e-5
    assert np.array_equal(f(x, skip=k, ada_scale=g, ada_shift=h), y)
    with pytest.raises(ArgumentError, match="skip= is required"):
        f(x, ada_scale=g, ada_shift=h)
    with pytest.raises(ArgumentError, match=r"ada_scale has shape \(32,\)"):
        f(x, skip=k, ada_scale=g[0], ada_shift=h)


@pytest.mark.parametrize("call,words", [
    (lambda f, x: f(x.astype(np.float64)), "dtype float64, the layer takes float32"),
    (lambda f, x: f(x[:, :16]), "must be 32"),
    (lambda f, x: f(x[0]), "has 3 dimensions"),
    (lambda f, x: f(x, scale=np.ones(32, np.float32)), "pass both scale and offset"),
    (lambda f, x: f(x, np.ones(16, np.float32), np.ones(16, np.float32)), "has 32 channels"),
    (lambda f, x: f(x, skip=x), "skip= given, but the spec does not fuse it"),
    (lambda f, x: f(x, sum=True), "needs a skip layer"),
])
def test_bad_arguments_are_refused_with_the_rule(call, words):
    _, spec = _trained_spec()
    f = gncodegen.compile(spec)["trained"]
    with pytest.raises(ArgumentError, match=words):
        call(f, np.zeros((2, 32, 6, 5), np.float32))


def test_callers_parameters_and_errors_of_the_library():
    gn, spec = _trained_spec()
    lib = gncodegen.compile(spec)
    x = torch.randn(1, 32, 6, 5)
    w, b = np.full(32, 2.0, np.float32), np.full(32, 0.5, np.float32)
    want = torch.nn.functional.group_norm(x, 8, torch.from_numpy(w), torch.from_numpy(b), 1e-5)
    assert np.max(np.abs(lib["trained"](x.numpy(), w, b) - want.numpy())) < 2e-5
    with pytest.raises(KeyError, match="no layer 'other'"):
        lib["other"]
    with pytest.raises(ArgumentError, match="the Python interface runs the c target"):
        gncodegen.compile(spec, target="cuda")
