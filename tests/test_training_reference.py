"""The float64 training reference (gncodegen.training) against outside oracles.

The backward pass against torch.autograd on every kind of format in both layouts, batch 1
and batch > 1, every activation, the skip, the modulation and all at once; against central
finite differences of the forward reference; the activations' derivatives at their
breakpoints against autograd; the solvers against MATLAB's update rules written out here
step by step; the kept statistics against torch and exact arithmetic.
"""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gncodegen.activations import parse_activation
from gncodegen.reference import (canonical, from_canonical, group_norm_reference, to_flat,
                                 to_logical)
from gncodegen.training import (adam_reference, reference_backward, rmsprop_reference,
                                sgdm_reference, train_statistics)

from conftest import make_layer

# (format, input_size, num_groups): sizes of the non-B labels in format order.
FORMATS = [
    ("CB", [12], 4),
    ("SCB", [7, 12], 3),
    ("SSCB", [5, 4, 12], 4),
    ("SSSCB", [3, 4, 2, 6], 2),
    ("CBT", [12, 5], 3),
    ("SCBT", [4, 6, 3], 2),
    ("SSCBT", [3, 3, 6, 4], 3),
    ("SC", [9, 8], 4),
    ("SSC", [4, 5, 6], 3),
    ("CT", [8, 7], 2),
    ("SCT", [5, 6, 3], 3),
    ("BSSC", [4, 5, 12], 4),      # NHWC when row-major
    ("BCSS", [12, 4, 5], 6),      # NCHW when row-major
    ("CSSB", [8, 3, 5], 2),
    ("TBC", [6, 9], 3),
    ("BTC", [5, 8], 4),
    ("SCUB", [4, 6, 3], 3),
    ("USSCB", [2, 3, 3, 4], 2),
    ("CUT", [6, 3, 4], 1),
    ("BSC", [7, 6], 6),           # B fastest in column-major, channel-wise groups
    ("SBSC", [3, 4, 6], 2),       # B between two S dims
]
LAYOUTS = ["column-major", "row-major"]
ACTIVATIONS = {
    "none": None,
    "relu": "relu",
    "leaky-relu": {"type": "leaky-relu", "scale": 0.2},
    "clipped-relu": {"type": "clipped-relu", "ceiling": 0.8},
    "elu": {"type": "elu", "alpha": 0.7},
    "gelu": "gelu",
    "gelu-tanh": {"type": "gelu", "approximation": "tanh"},
    "swish": "swish",
    "sigmoid": "sigmoid",
    "tanh": "tanh",
}
RTOL = 1e-10


def _layer(fmt, size, groups, layout="column-major", **keys):
    keys.setdefault("dtype", "double")
    keys.setdefault("epsilon", 1e-3)
    keys.setdefault("scale_initializer", "narrow-normal")
    keys.setdefault("offset_initializer", "narrow-normal")
    keys.setdefault("seed", 7)
    return make_layer(name="tr", format=fmt, input_size=size, num_groups=groups,
                      layout=layout, **keys)


def _torch_activation(act, z):
    """PyTorch's own op for an activation (not derived from the reference's formulas)."""
    k = act.kind
    if k == "none":
        return z
    if k == "relu":
        return F.relu(z)
    if k == "leaky-relu":
        return F.leaky_relu(z, act.scale)
    if k == "clipped-relu":
        return F.hardtanh(z, 0.0, act.ceiling)
    if k == "elu":
        return F.elu(z, act.alpha)
    if k == "gelu":
        return F.gelu(z, approximate=act.approximation)
    if k == "swish":
        return F.silu(z)
    if k == "sigmoid":
        return torch.sigmoid(z)
    assert k == "tanh"
    return torch.tanh(z)


def _inputs(layer, batch, seed):
    """Random x, dy, scale, offset, skip, ada_scale, ada_shift (flat float64)."""
    rng = np.random.default_rng(seed)
    nobs = batch if layer.has_batch else 1        # a format without B holds one observation
    numel = layer.observation_numel * nobs
    c = layer.num_channels
    return dict(x=rng.normal(0.5, 2.0, numel), dy=rng.normal(0.0, 1.0, numel),
                scale=rng.normal(1.0, 0.5, c), offset=rng.normal(0.0, 0.5, c),
                skip=rng.normal(-0.3, 1.0, numel) if layer.skip else None,
                ada_scale=rng.normal(0.0, 0.5, nobs * c) if layer.adaptive else None,
                ada_shift=rng.normal(0.0, 0.5, nobs * c) if layer.adaptive else None)


def _torch_backward(layer, batch, inp):
    """The gradients torch.autograd gives for the layer's ops written in PyTorch."""
    nobs = batch if layer.has_batch else 1
    c = layer.num_channels

    def canon(flat):
        return torch.from_numpy(np.ascontiguousarray(canonical(to_logical(flat, layer, batch),
                                                               layer)))

    def leaf(values, shape=None):
        t = torch.tensor(np.asarray(values), dtype=torch.float64)
        return (t if shape is None else t.reshape(shape)).requires_grad_(True)

    x = canon(inp["x"]).requires_grad_(True)
    scale, offset = leaf(inp["scale"]), leaf(inp["offset"])
    v = x
    if layer.skip:
        skip = canon(inp["skip"]).requires_grad_(True)
        v = x + skip
    z = F.group_norm(v, layer.num_groups, scale, offset, layer.epsilon)
    if layer.adaptive:
        gain = leaf(inp["ada_scale"], (nobs, c, 1))
        shift = leaf(inp["ada_shift"], (nobs, c, 1))
        z = z * (1 + gain) + shift
    y = _torch_activation(layer.activation, z)
    y.backward(canon(inp["dy"]))

    def flat(t):
        return to_flat(from_canonical(t.grad.numpy(), layer, batch), layer)

    out = {"dx": flat(x), "dscale": scale.grad.numpy(), "doffset": offset.grad.numpy()}
    if layer.skip:
        out["dskip"] = flat(skip)
    if layer.adaptive:
        out["dada_scale"] = gain.grad.numpy().reshape(-1)
        out["dada_shift"] = shift.grad.numpy().reshape(-1)
    return out


def _close(ours, theirs, what, rtol=RTOL):
    """Assert |ours - theirs| <= rtol * max |theirs| (elementwise, shapes equal)."""
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    assert ours.shape == theirs.shape, (what, ours.shape, theirs.shape)
    assert ours.dtype == np.float64, (what, ours.dtype)
    bound = rtol * max(1.0, float(np.max(np.abs(theirs))))
    err = float(np.max(np.abs(ours - theirs)))
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g}"


def _check_against_torch(layer, batch, seed=0):
    inp = _inputs(layer, batch, seed)
    ours = reference_backward(layer, inp["x"], inp["dy"], batch, inp["scale"], inp["offset"],
                              skip=inp["skip"], ada_scale=inp["ada_scale"],
                              ada_shift=inp["ada_shift"])
    theirs = _torch_backward(layer, batch, inp)
    assert set(ours) == {"dx", "dscale", "doffset", "dada_scale", "dada_shift", "dx_terms"}
    for key in ("dx", "dscale", "doffset"):
        _close(ours[key], theirs[key], key)
    if layer.skip:
        _close(ours["dx"], theirs["dskip"], "dskip")
    if layer.adaptive:
        _close(ours["dada_scale"], theirs["dada_scale"], "dada_scale")
        _close(ours["dada_shift"], theirs["dada_shift"], "dada_shift")
    else:
        assert ours["dada_scale"] is None and ours["dada_shift"] is None
    # the gradients are not trivially small (the comparison means something)
    assert np.max(np.abs(theirs["dx"])) > 1e-2 and np.max(np.abs(theirs["dscale"])) > 1e-2


# --------------------------------------------------------------------------- against autograd


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("fmt,size,groups", FORMATS, ids=[f[0] for f in FORMATS])
def test_backward_matches_autograd_on_every_format(fmt, size, groups, layout, batch):
    _check_against_torch(_layer(fmt, size, groups, layout), batch)


@pytest.mark.parametrize("act", list(ACTIVATIONS))
@pytest.mark.parametrize("fmt,size,groups,layout", [
    ("SSCB", [3, 4, 8], 4, "column-major"),
    ("BCSS", [6, 3, 4], 3, "row-major"),
    ("CBT", [6, 5], 2, "row-major"),
], ids=["SSCB", "BCSS-row", "CBT-row"])
def test_backward_matches_autograd_for_every_activation(act, fmt, size, groups, layout):
    layer = _layer(fmt, size, groups, layout, activation=ACTIVATIONS[act])
    _check_against_torch(layer, 2, seed=1)


@pytest.mark.parametrize("fusion", [dict(skip=True), dict(adaptive=True),
                                    dict(skip=True, adaptive=True, activation="swish"),
                                    dict(skip=True, adaptive=True,
                                         activation={"type": "gelu", "approximation": "tanh"})],
                         ids=["skip", "adaptive", "all-swish", "all-gelu-tanh"])
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("fmt,size,groups,layout", [
    ("SSCB", [3, 4, 8], 4, "column-major"),
    ("SSCB", [3, 4, 8], 2, "row-major"),
    ("BSSC", [3, 2, 6], 3, "row-major"),
    ("CBT", [6, 5], 6, "column-major"),
    ("SC", [7, 6], 3, "row-major"),           # no B: one observation
], ids=["SSCB", "SSCB-row", "BSSC-row", "CBT", "SC-row"])
def test_backward_matches_autograd_with_the_fusions(fusion, batch, fmt, size, groups, layout):
    _check_against_torch(_layer(fmt, size, groups, layout, **fusion), batch, seed=2)


def test_defaults_are_the_layers_own_parameters():
    layer = _layer("SSCB", [3, 3, 6], 3, activation="tanh")
    inp = _inputs(layer, 2, 5)
    got = reference_backward(layer, inp["x"], inp["dy"], 2)
    want = reference_backward(layer, inp["x"], inp["dy"], 2, layer.scale, layer.offset)
    for key in ("dx", "dscale", "doffset"):
        np.testing.assert_array_equal(got[key], want[key])
    inp.update(scale=np.asarray(layer.scale), offset=np.asarray(layer.offset))
    theirs = _torch_backward(layer, 2, inp)
    _close(got["dx"], theirs["dx"], "dx")
    _close(got["dscale"], theirs["dscale"], "dscale")


def test_skip_in_storage_type_differentiates_the_rounded_sum():
    """A single-precision skip layer normalizes x + skip rounded to float32: its gradient is
    that of the plain layer at the rounded sum."""
    keys = dict(activation="swish", dtype="single")
    layer = _layer("SSCB", [3, 4, 6], 3, skip=True, **keys)
    plain = _layer("SSCB", [3, 4, 6], 3, **keys)
    rng = np.random.default_rng(9)
    n = layer.observation_numel * 2
    x, skip = (rng.normal(0.0, 1.0, n).astype(np.float32) for _ in range(2))
    dy = rng.normal(0.0, 1.0, n)
    summed = (x.astype(np.float64) + skip.astype(np.float64)).astype(np.float32)
    got = reference_backward(layer, x, dy, 2, skip=skip)
    want = reference_backward(plain, summed, dy, 2)
    for key in ("dx", "dscale", "doffset"):
        np.testing.assert_array_equal(got[key], want[key])
    inp = dict(x=summed.astype(np.float64), dy=dy, scale=np.asarray(plain.scale),
               offset=np.asarray(plain.offset), skip=None, ada_scale=None, ada_shift=None)
    _close(got["dx"], _torch_backward(plain, 2, inp)["dx"], "dx")


@pytest.mark.parametrize("act", ["relu", "leaky-relu", "clipped-relu", "elu"])
def test_derivative_breakpoints_follow_autograd(act):
    activation = parse_activation(ACTIVATIONS[act], "activation")
    points = np.array([-2.0, -1e-300, 0.0, 1e-300, 0.5, 0.8, 0.8 + 1e-12, 3.0])
    z = torch.tensor(points, requires_grad=True)
    _torch_activation(activation, z).sum().backward()
    np.testing.assert_array_equal(activation.derivative(points), z.grad.numpy())


@pytest.mark.parametrize("act", list(ACTIVATIONS))
def test_derivative_matches_autograd_across_the_range(act):
    activation = parse_activation(ACTIVATIONS[act], "activation")
    points = np.concatenate([np.linspace(-12.0, 12.0, 481), [-40.0, 40.0, 0.0]])
    z = torch.tensor(points, requires_grad=True)
    _torch_activation(activation, z).sum().backward()
    got = activation.derivative(points)
    assert got.dtype == np.float64 and got.shape == points.shape
    # atol: in gelu-tanh's far tail, 1 + tanh cancels to rounding errors of order 1e-15
    np.testing.assert_allclose(got, z.grad.numpy(), rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------- finite differences


@pytest.mark.parametrize("act", ["gelu", "tanh", "elu", "swish"])
def test_backward_matches_central_differences(act):
    """L = sum(w * y) of the forward reference, perturbed one input at a time."""
    layer = _layer("SCB", [3, 4], 2, "row-major", skip=True, adaptive=True,
                   activation=ACTIVATIONS[act])
    batch, c = 2, layer.num_channels
    rng = np.random.default_rng(11)
    n = layer.observation_numel * batch
    args = dict(x=rng.normal(0.3, 1.5, n), skip=rng.normal(0.0, 1.0, n),
                scale=rng.normal(1.0, 0.5, c), offset=rng.normal(0.0, 0.5, c),
                ada_scale=rng.normal(0.0, 0.5, batch * c),
                ada_shift=rng.normal(0.0, 0.5, batch * c))
    w = rng.normal(0.0, 1.0, n)

    def loss(**changed):
        a = {**args, **changed}
        y = group_norm_reference(a["x"], layer, batch, a["scale"], a["offset"], skip=a["skip"],
                                 ada_scale=a["ada_scale"], ada_shift=a["ada_shift"])
        return math.fsum(w * y)

    grads = reference_backward(layer, args["x"], w, batch, args["scale"], args["offset"],
                               skip=args["skip"], ada_scale=args["ada_scale"],
                               ada_shift=args["ada_shift"])
    h = 1e-6
    for name, key in (("x", "dx"), ("skip", "dx"), ("scale", "dscale"), ("offset", "doffset"),
                      ("ada_scale", "dada_scale"), ("ada_shift", "dada_shift")):
        base = args[name]
        numeric = np.empty(base.size)
        for i in range(base.size):
            up, down = base.copy(), base.copy()
            up[i] += h
            down[i] -= h
            numeric[i] = (loss(**{name: up}) - loss(**{name: down})) / (2 * h)
        np.testing.assert_allclose(grads[key], numeric, rtol=1e-6, atol=1e-7,
                                   err_msg=f"d/d{name}")


# --------------------------------------------------------------------------- the solvers


def _solver_layer(**factors):
    return _layer("SSCB", [2, 2, 6], 3, **factors)


FACTORS = {
    "default": {},
    "non-default": dict(scale_learn_rate_factor=2.0, offset_l2_factor=0.5,
                        scale_l2_factor=3.0, offset_learn_rate_factor=0.25),
    "scale-frozen": dict(scale_learn_rate_factor=0.0, offset_l2_factor=0.5),
    "offset-frozen": dict(offset_learn_rate_factor=0.0, scale_learn_rate_factor=2.0),
}


def _solver_start(c, seed):
    rng = np.random.default_rng(seed)
    return (rng.normal(1.0, 0.3, c), rng.normal(0.0, 0.3, c),
            [(rng.normal(0.0, 1.0, c), rng.normal(0.0, 1.0, c)) for _ in range(4)])


def _frozen(layer, which):
    return getattr(layer, f"{which}_learn_rate_factor") == 0


def _check_frozen(layer, start, end, states_start, states_end):
    """A parameter with learn-rate factor 0 keeps its value and every state bit for bit."""
    for i, which in enumerate(("scale", "offset")):
        if _frozen(layer, which):
            np.testing.assert_array_equal(end[i], start[i])
            for s0, s1 in zip(states_start, states_end):
                np.testing.assert_array_equal(s1[i], s0[i])
        else:
            assert np.all(end[i] != start[i])


@pytest.mark.parametrize("factors", list(FACTORS))
def test_sgdm_follows_sgdmupdate(factors):
    layer = _solver_layer(**FACTORS[factors])
    c = layer.num_channels
    scale, offset, grads = _solver_start(c, 21)
    lr, mom, l2 = 0.05, 0.9, 1e-3
    # MATLAB's sgdmupdate, written out
    want = {"scale": (scale.copy(), np.zeros(c), layer.scale_learn_rate_factor,
                      layer.scale_l2_factor),
            "offset": (offset.copy(), np.zeros(c), layer.offset_learn_rate_factor,
                       layer.offset_l2_factor)}
    s, o, sv, ov = scale, offset, np.zeros(c), np.zeros(c)
    for ds, do in grads:
        for which, dp in (("scale", ds), ("offset", do)):
            p, vel, lrf, l2f = want[which]
            if lrf:
                vel = mom * vel - lr * lrf * (dp + l2 * l2f * p)
                p = p + vel
            want[which] = (p, vel, lrf, l2f)
        given = (s, o, sv, ov, ds, do)
        kept = [a.copy() for a in given]
        s, o, sv, ov = sgdm_reference(layer, s, o, sv, ov, ds, do, lr, mom, l2)
        for before, now in zip(kept, given):
            np.testing.assert_array_equal(now, before)     # the inputs were not modified
        assert all(new is not old for new, old in zip((s, o, sv, ov), given))
    np.testing.assert_allclose(s, want["scale"][0], rtol=1e-14)
    np.testing.assert_allclose(o, want["offset"][0], rtol=1e-14)
    np.testing.assert_allclose(sv, want["scale"][1], rtol=1e-14)
    np.testing.assert_allclose(ov, want["offset"][1], rtol=1e-14)
    _check_frozen(layer, (scale, offset), (s, o), [(np.zeros(c), np.zeros(c))], [(sv, ov)])


@pytest.mark.parametrize("factors", list(FACTORS))
def test_adam_follows_adamupdate(factors):
    layer = _solver_layer(**FACTORS[factors])
    c = layer.num_channels
    scale, offset, grads = _solver_start(c, 22)
    lr, b1, b2, eps, l2 = 1e-2, 0.9, 0.999, 1e-8, 1e-4
    want = {}
    for which, p in (("scale", scale), ("offset", offset)):
        lrf = getattr(layer, f"{which}_learn_rate_factor")
        l2f = getattr(layer, f"{which}_l2_factor")
        p, m, v = p.copy(), np.zeros(c), np.zeros(c)
        for t, pair in enumerate(grads, start=1):
            dp = pair[0] if which == "scale" else pair[1]
            if lrf == 0:
                continue
            g = dp + l2 * l2f * p
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            p = p - lr * lrf * math.sqrt(1 - b2 ** t) / (1 - b1 ** t) * m / (np.sqrt(v) + eps)
        want[which] = (p, m, v)
    state = (scale, offset, np.zeros(c), np.zeros(c), np.zeros(c), np.zeros(c))
    for t, (ds, do) in enumerate(grads, start=1):
        state = adam_reference(layer, *state, ds, do, t, lr, b1, b2, eps, l2)
    s, o, sm, om, sv, ov = state
    for got, wanted in ((s, want["scale"][0]), (o, want["offset"][0]),
                        (sm, want["scale"][1]), (om, want["offset"][1]),
                        (sv, want["scale"][2]), (ov, want["offset"][2])):
        np.testing.assert_allclose(got, wanted, rtol=1e-13)
    zero = np.zeros(c)
    _check_frozen(layer, (scale, offset), (s, o), [(zero, zero), (zero, zero)],
                  [(sm, om), (sv, ov)])
    with pytest.raises(ValueError):
        adam_reference(layer, scale, offset, zero, zero, zero, zero, *grads[0], 0, lr, b1, b2,
                       eps, l2)


def test_adam_first_step_moves_each_parameter_by_the_learn_rate():
    """With no L2 and state zero, step 1 moves every element by lr * factor (sign of -g)."""
    layer = _solver_layer(scale_learn_rate_factor=2.0)
    c = layer.num_channels
    scale, offset, grads = _solver_start(c, 23)
    zero = np.zeros(c)
    s, o, *_ = adam_reference(layer, scale, offset, zero, zero, zero, zero, *grads[0], 1,
                              1e-3, 0.9, 0.999, 0.0, 0.0)
    np.testing.assert_allclose(s - scale, -2e-3 * np.sign(grads[0][0]), rtol=1e-12)
    np.testing.assert_allclose(o - offset, -1e-3 * np.sign(grads[0][1]), rtol=1e-12)


@pytest.mark.parametrize("factors", list(FACTORS))
def test_rmsprop_follows_rmspropupdate(factors):
    layer = _solver_layer(**FACTORS[factors])
    c = layer.num_channels
    scale, offset, grads = _solver_start(c, 24)
    lr, rho, eps, l2 = 1e-3, 0.9, 1e-8, 1e-2
    want = {}
    for which, p in (("scale", scale), ("offset", offset)):
        lrf = getattr(layer, f"{which}_learn_rate_factor")
        l2f = getattr(layer, f"{which}_l2_factor")
        p, sq = p.copy(), np.zeros(c)
        for pair in grads:
            dp = pair[0] if which == "scale" else pair[1]
            if lrf == 0:
                continue
            g = dp + l2 * l2f * p
            sq = rho * sq + (1 - rho) * g * g
            p = p - lr * lrf * g / (np.sqrt(sq) + eps)
        want[which] = (p, sq)
    state = (scale, offset, np.zeros(c), np.zeros(c))
    for ds, do in grads:
        state = rmsprop_reference(layer, *state, ds, do, lr, rho, eps, l2)
    s, o, ssq, osq = state
    for got, wanted in ((s, want["scale"][0]), (o, want["offset"][0]),
                        (ssq, want["scale"][1]), (osq, want["offset"][1])):
        np.testing.assert_allclose(got, wanted, rtol=1e-13)
    zero = np.zeros(c)
    _check_frozen(layer, (scale, offset), (s, o), [(zero, zero)], [(ssq, osq)])


def test_frozen_parameter_keeps_nonzero_state():
    """A learn-rate factor of 0 leaves the state as given, not reset (and not decayed)."""
    layer = _solver_layer(offset_learn_rate_factor=0.0)
    c = layer.num_channels
    scale, offset, grads = _solver_start(c, 25)
    vel = np.full(c, 0.25)
    _, o, _, ov = sgdm_reference(layer, scale, offset, vel, vel, *grads[0], 0.1, 0.9, 0.1)
    np.testing.assert_array_equal(o, offset)
    np.testing.assert_array_equal(ov, vel)
    _, o, _, om, _, ov = adam_reference(layer, scale, offset, vel, vel, vel, vel, *grads[0], 3,
                                        0.1, 0.9, 0.999, 1e-8, 0.1)
    np.testing.assert_array_equal(o, offset)
    np.testing.assert_array_equal(om, vel)
    np.testing.assert_array_equal(ov, vel)
    _, o, _, osq = rmsprop_reference(layer, scale, offset, vel, vel, *grads[0], 0.1, 0.9,
                                     1e-8, 0.1)
    np.testing.assert_array_equal(o, offset)
    np.testing.assert_array_equal(osq, vel)


# --------------------------------------------------------------------------- the statistics


def _torch_statistics(x, layer, batch):
    canon = canonical(to_logical(np.asarray(x, dtype=np.float64), layer, batch), layer)
    t = torch.from_numpy(np.ascontiguousarray(canon)).reshape(canon.shape[0],
                                                              layer.num_groups, -1)
    var, mean = torch.var_mean(t, dim=2, correction=0)
    return (mean.reshape(-1).numpy(),
            (1.0 / torch.sqrt(var + layer.epsilon)).reshape(-1).numpy(), t.numpy())


@pytest.mark.parametrize("fmt,size,groups,layout", [
    ("SSCB", [4, 5, 8], 4, "column-major"),
    ("BCSS", [6, 4, 5], 3, "row-major"),
    ("CBT", [6, 9], 2, "row-major"),
    ("SC", [50, 4], 2, "column-major"),
], ids=["SSCB", "BCSS-row", "CBT-row", "SC"])
def test_statistics_at_mean_1e4(fmt, size, groups, layout):
    layer = _layer(fmt, size, groups, layout, dtype="single", epsilon=1e-5)
    batch = 3
    nobs = batch if layer.has_batch else 1
    rng = np.random.default_rng(31)
    x = rng.normal(1e4, 1.0, layer.observation_numel * nobs).astype(np.float32)
    mean, rstd = train_statistics(x, layer, batch)
    assert mean.shape == rstd.shape == (nobs * groups,)
    assert mean.dtype == rstd.dtype == np.float64
    t_mean, t_rstd, grouped = _torch_statistics(x, layer, batch)
    np.testing.assert_allclose(mean, t_mean, rtol=1e-15)
    np.testing.assert_allclose(rstd, t_rstd, rtol=1e-11)
    # and exactly rounded arithmetic (statistics works in fractions for floats)
    for k, group in enumerate(grouped.reshape(nobs * groups, -1)):
        values = [float(v) for v in group]
        exact_mean = statistics.fmean(values)
        exact_rstd = 1.0 / math.sqrt(statistics.pvariance(values) + layer.epsilon)
        assert abs(mean[k] - exact_mean) <= 2e-12, (k, mean[k], exact_mean)
        assert abs(rstd[k] / exact_rstd - 1.0) <= 1e-13, (k, rstd[k], exact_rstd)


def test_statistics_of_a_skip_layer_are_those_of_the_rounded_sum():
    layer = _layer("SSCB", [3, 3, 6], 2, dtype="single", skip=True)
    plain = _layer("SSCB", [3, 3, 6], 2, dtype="single")
    rng = np.random.default_rng(32)
    n = layer.observation_numel * 2
    x = rng.normal(1e4, 1.0, n).astype(np.float32)
    skip = rng.normal(0.0, 1.0, n).astype(np.float32)
    summed = (x.astype(np.float64) + skip.astype(np.float64)).astype(np.float32)
    got = train_statistics(x, layer, 2, skip=skip)
    want = train_statistics(summed, plain, 2)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


def test_constant_group_has_rstd_one_over_sqrt_epsilon():
    layer = _layer("SCB", [5, 6], 3, "row-major", dtype="single", epsilon=1e-4)
    batch = 2
    logical = np.random.default_rng(33).normal(0.0, 1.0, (5, 6, batch))
    logical[:, 2:4, 1] = 1e4 + 0.5                 # observation 1, group 1: constant
    x = to_flat(logical, layer).astype(np.float32)
    mean, rstd = train_statistics(x, layer, batch)
    assert mean[1 * 3 + 1] == 1e4 + 0.5
    assert rstd[1 * 3 + 1] == 1.0 / math.sqrt(1e-4)
    assert np.all(rstd[[0, 1, 2, 3, 5]] < 10.0)
