"""The generated C's training entry points (forward_train, backward and the three solvers'
updates), built through cffi and checked against outside oracles.

forward_train and backward against torch.autograd on float64 tensors of the same float32
inputs, with this file's own layout conversion (not gncodegen.reference's): every format in
both layouts at batch 1 and 3, every activation, the skip, the modulation and all at once,
runtime sizes at two sizes, double precision. The numerics classes (a mean of 1e4, tiny
variances, constant groups, a large group) against the float64 reference and torch. Threads
give the same bits as one thread. The solvers against MATLAB's sgdmupdate, adamupdate and
rmspropupdate written out here, with non-default and zero learn-rate factors; the error codes;
dx in place of dy; and a short SGDM training loop through the C.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gncodegen.build import cache_root
from gncodegen.plan import lower
from gncodegen.targets.c import render_c
from gncodegen.targets.c.runner import build_c_module
from gncodegen.training import reference_backward, train_statistics

from conftest import make_layer

OK, ERR_NULL, ERR_BATCH, ERR_STEP = 0, -1, -2, -4
RTOL = {"single": 2e-5, "double": 1e-12}

# --------------------------------------------------------------------------- the layers

# Activations: the spec's value and PyTorch's own op for it (written here, independently of
# how the spec is parsed).
ACTIVATIONS = {
    "none": (None, lambda z: z),
    "relu": ("relu", F.relu),
    "leaky-relu": ({"type": "leaky-relu", "scale": 0.2}, lambda z: F.leaky_relu(z, 0.2)),
    "clipped-relu": ({"type": "clipped-relu", "ceiling": 0.8},
                     lambda z: F.hardtanh(z, 0.0, 0.8)),
    "clipped-relu-6": ({"type": "clipped-relu", "ceiling": 6}, lambda z: F.hardtanh(z, 0.0, 6.0)),
    "elu": ({"type": "elu", "alpha": 0.7}, lambda z: F.elu(z, 0.7)),
    "gelu": ("gelu", F.gelu),
    "gelu-tanh": ({"type": "gelu", "approximation": "tanh"},
                  lambda z: F.gelu(z, approximate="tanh")),
    "swish": ("swish", F.silu),
    "sigmoid": ("sigmoid", torch.sigmoid),
    "tanh": ("tanh", torch.tanh),
}

# (format, input_size, num_groups): every format family, each built in both layouts.
FORMATS = [
    ("SSCB", [5, 3, 12], 4),
    ("BCSS", [12, 4, 5], 3),      # NCHW when row-major
    ("BSSC", [4, 3, 12], 4),      # NHWC when row-major
    ("CB", [12], 4),
    ("CBT", [6, 5], 3),
    ("SCB", [7, 6], 2),
    ("SSSCB", [3, 2, 4, 6], 3),
    ("BCSSS", [6, 3, 2, 4], 2),
    ("SSC", [4, 5, 6], 3),        # no B: one observation
    ("TBC", [5, 8], 4),
    ("SBC", [6, 6], 2),           # B between S and C
]
LAYOUTS = ("column-major", "row-major")
SHORT = {"column-major": "col", "row-major": "row"}

FUSIONS = {
    "skip": dict(skip=True),
    "adaptive": dict(adaptive=True),
    "adaptive-tanh": dict(adaptive=True, activation="tanh"),
    "all": dict(skip=True, adaptive=True, activation="swish"),
    "all-gelu-tanh": dict(skip=True, adaptive=True,
                          activation={"type": "gelu", "approximation": "tanh"}),
}
FUSION_ACT = {"skip": "none", "adaptive": "none", "adaptive-tanh": "tanh", "all": "swish",
              "all-gelu-tanh": "gelu-tanh"}
FUSION_SHAPES = {
    "SSCB-col": dict(format="SSCB", input_size=[3, 4, 8], num_groups=4),
    "BSSC-row": dict(format="BSSC", layout="row-major", input_size=[3, 2, 6], num_groups=3),
    "SC-row": dict(format="SC", layout="row-major", input_size=[7, 6], num_groups=3),
    # channels fastest, groups of 16 channels: backward's rows jobs take 4 groups (256 bytes of
    # a row) each, so a layer has several blocks, with and without B
    "BSSC-blocks": dict(format="BSSC", layout="row-major", input_size=[2, 3, 256],
                        num_groups=16),
    "SSC-blocks": dict(format="SSC", layout="row-major", input_size=[3, 3, 128], num_groups=8),
}

# name: (spec keys, the sizes to run at, the activation's name)
RUNTIME = {
    "sscb-col-any": (dict(format="SSCB", input_size=[None, 4, 6], num_groups=3), [(3,), (7,)],
                     "none"),
    "cbt-col-max": (dict(format="CBT", input_size=[6, {"max": 9}], num_groups=2, skip=True,
                         adaptive=True, activation=ACTIVATIONS["elu"][0]), [(4,), (9,)], "elu"),
    # memory order T, B, C: the observation stride is t, not the observation's numel
    "cbt-row-max": (dict(format="CBT", layout="row-major", input_size=[6, {"max": 9}],
                         num_groups=2), [(4,), (9,)], "none"),
    # memory order S, B, C: the observation stride is s1
    "sbc-col-any": (dict(format="SBC", input_size=[None, 6], num_groups=2), [(2,), (5,)],
                    "none"),
}
DOUBLE_ALL = dict(format="SSCB", layout="row-major", input_size=[4, 3, 6], num_groups=3,
                  skip=True, adaptive=True, activation="swish")


def _spec(name: str) -> dict:
    """Return the spec keys (besides name and training) of one test layer, by its name."""
    kind, _, rest = name.partition(":")
    if kind == "fmt":
        fmt, layout = rest.split("-")
        size, groups = next((s, g) for f, s, g in FORMATS if f == fmt)
        return dict(format=fmt, layout={"col": "column-major", "row": "row-major"}[layout],
                    input_size=size, num_groups=groups)
    if kind == "act":
        return dict(format="BCSS", layout="row-major", input_size=[6, 3, 4], num_groups=3,
                    activation=ACTIVATIONS[rest][0])
    if kind == "fusion":
        fusion, shape = rest.split("/")
        return {**FUSION_SHAPES[shape], **FUSIONS[fusion]}
    if kind == "runtime":
        return RUNTIME[rest][0]
    if kind == "double":
        if rest == "all":
            return dict(DOUBLE_ALL, dtype="double")
        return dict(format="CBT", input_size=[8, 5], num_groups=4, dtype="double",
                    activation=ACTIVATIONS[rest][0])
    if kind == "numerics":
        return dict(format="SSCB", input_size=[4, 5, 8], num_groups=2, **NUMERIC_EPS.get(rest, {}))
    if kind == "large" and not rest:
        return dict(format="SSCB", input_size=[64, 64, 16], num_groups=2)
    if kind == "threads":
        threads, which = rest.split("/")
        extra = THREAD_SHAPES[which]
        return dict(threads=int(threads), **extra)
    if kind == "solver":
        return dict(format="CB", input_size=[6], num_groups=2, **SOLVER_FACTORS[rest])
    if kind == "fit" and not rest:
        return dict(format="SSCB", input_size=[4, 4, 6], num_groups=3, activation="tanh")
    raise KeyError(name)


NUMERIC_EPS = {"tiny-eps": dict(epsilon=1e-9)}
THREAD_SHAPES = {
    # batch 8 of 8192 elements: 65536, the size where OpenMP starts
    "nchw": dict(format="BCSS", layout="row-major", input_size=[8, 32, 32], num_groups=4),
    "all": dict(format="SSCB", input_size=[16, 32, 16], num_groups=4, skip=True, adaptive=True,
                activation="gelu"),
    # channels fastest, four blocks of four groups: the threads split the blocks
    "nhwc-blocks": dict(format="BSSC", layout="row-major", input_size=[16, 16, 256],
                        num_groups=16),
}
SOLVER_FACTORS = {
    "frozen-scale": dict(ScaleLearnRateFactor=0),
    "frozen-offset": dict(OffsetLearnRateFactor=0, ScaleL2Factor=2),
    "factors": dict(ScaleLearnRateFactor=2, OffsetL2Factor=0.5, ScaleL2Factor=3,
                    OffsetLearnRateFactor=0.25),
    "default": dict(),
}


def _cname(name: str) -> str:
    """Return a C identifier for a test layer's name."""
    return "tc_" + "".join(ch if ch.isalnum() else "_" for ch in name).lower().rstrip("_")


@functools.lru_cache(maxsize=None)
def _module(*names: str):
    """Return {name: Lib} of test layers compiled together into one cffi module (cached by
    content across workers and runs)."""
    layers = [make_layer(name=_cname(n), training=True, **_spec(n)) for n in names]
    plans = tuple(lower(layer) for layer in layers)
    sources = [s for p in plans for s in render_c(p, "test.yaml")]
    # one pytest-xdist worker builds a group while another that needs it waits, then loads it
    # from the cache (two building it at once would take twice the CPU)
    key = hashlib.sha256("\0".join(s.text for s in sources).encode()).hexdigest()[:16]
    locks = cache_root() / "test-locks"     # beside the builds, removed with the cache
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"training-c-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        module = build_c_module(plans, sources)
    return {n: Lib(layer, plan, module, sources) for n, layer, plan in zip(names, layers, plans)}


def _lib(name: str, *group: str) -> "Lib":
    return _module(*(group or (name,)))[name]


GUARD = -7777.0     # what the padding after every buffer holds, to catch writes past its end


class Lib:
    """A training layer's entry points in a built module, called on NumPy arrays.

    Every buffer is the start of an allocation three times its size whose tail holds GUARD: a
    read past the end stays in memory we own, and a write past it fails the call's check
    (instead of corrupting the heap)."""

    def __init__(self, layer, plan, module, sources):
        self.layer, self.plan, self.ffi, self.lib = layer, plan, module.ffi, module.lib
        self.prefix = plan.prefix
        self.np = np.float64 if layer.dtype == "double" else np.float32
        self.ctype = "double" if layer.dtype == "double" else "float"
        self.header = next(s.text for s in sources if s.name == f"{plan.prefix}.h")
        self._guarded: list[tuple[np.ndarray, int]] = []

    def fn(self, what: str):
        return getattr(self.lib, f"{self.prefix}_{what}")

    def p(self, arr):
        if arr is None:
            return self.ffi.NULL
        assert arr.dtype == self.np and arr.flags.c_contiguous
        return self.ffi.from_buffer(f"{self.ctype}[]", arr)

    def own(self, values) -> np.ndarray:
        """A copy of values in the storage type, padded by guards."""
        values = np.asarray(values, dtype=self.np).reshape(-1)
        n = values.size
        base = np.full(3 * n + 64, GUARD, self.np)
        base[:n] = values
        self._guarded.append((base, n))
        return base[:n]

    def out(self, n: int) -> np.ndarray:
        """An output buffer of n NaNs, padded by guards."""
        return self.own(np.full(n, np.nan))

    def check(self, what: str, rc: int, want: int = OK) -> None:
        """Assert the call returned want and wrote nothing past the end of any buffer made
        since the last check."""
        guarded, self._guarded = self._guarded, []
        assert rc == want, f"{self.prefix}_{what} returned {rc}, not {want}"
        for base, n in guarded:
            bad = np.flatnonzero(base[n:] != GUARD)
            assert not bad.size, (f"{self.prefix}_{what} wrote past the end of a buffer of "
                                  f"{n} elements (up to element {n + int(bad[-1])})")

    def nobs(self, batch: int) -> int:
        return batch if self.layer.has_batch else 1

    def forward_train(self, inp: dict, batch: int, sizes=(), want_sum=True) -> dict:
        lay = self.layer
        x = self.own(inp["x"])
        y = self.out(x.size)
        stats = self.nobs(batch) * lay.num_groups
        mean, rstd = self.out(stats), self.out(stats)
        fusion, total = [], None
        if lay.skip:
            total = self.out(x.size) if want_sum else None
            fusion += [self.p(self.own(inp["skip"])), self.p(total)]
        if lay.adaptive:
            fusion += [self.p(self.own(inp["ada_scale"])), self.p(self.own(inp["ada_shift"]))]
        rc = self.fn("forward_train")(self.p(x), self.p(y), batch, *sizes,
                                      self.p(self.own(inp["scale"])),
                                      self.p(self.own(inp["offset"])), *fusion,
                                      self.p(mean), self.p(rstd))
        self.check("forward_train", rc)
        return dict(y=y, mean=mean, rstd=rstd, sum=total)

    def backward(self, inp: dict, batch: int, mean, rstd, sizes=(), dx=None, dy=None) -> dict:
        """backward; dx and dy are the caller's buffers where given (dx may be dy)."""
        lay = self.layer
        x = self.own(inp["x"])
        dy = self.own(inp["dy"]) if dy is None else dy
        dx = self.out(x.size) if dx is None else dx
        c = lay.num_channels
        dscale, doffset = self.out(c), self.out(c)
        dada = [self.out(self.nobs(batch) * c) for _ in range(2)] if lay.adaptive else []
        fusion = ([self.p(self.own(inp["skip"]))] if lay.skip else []) + (
            [self.p(self.own(inp["ada_scale"])), self.p(self.own(inp["ada_shift"]))]
            if lay.adaptive else [])
        rc = self.fn("backward")(self.p(x), self.p(dy), self.p(dx), self.p(dscale),
                                 self.p(doffset), *(self.p(d) for d in dada), batch, *sizes,
                                 self.p(self.own(inp["scale"])), self.p(self.own(inp["offset"])),
                                 *fusion, self.p(self.own(mean)), self.p(self.own(rstd)))
        self.check("backward", rc)
        out = dict(dx=dx, dscale=dscale, doffset=doffset)
        if lay.adaptive:
            out.update(dada_scale=dada[0], dada_shift=dada[1])
        return out

    def step(self, inp: dict, batch: int, sizes=()) -> dict:
        fwd = self.forward_train(inp, batch, sizes)
        return {**fwd, **self.backward(inp, batch, fwd["mean"], fwd["rstd"], sizes)}


# --------------------------------------------------------------------------- the oracle


def _shape(layer, batch: int, sizes=()) -> list[int]:
    """Return the size of every format letter in order (B's is batch)."""
    fixed = layer.at_sizes(sizes) if layer.runtime_sizes else layer
    rest = iter(fixed.input_size)
    return [batch if ch == "B" else next(rest) for ch in layer.format]


def _order(layer) -> str:
    # column-major: the first letter is fastest (Fortran order); row-major: the last
    return "F" if layer.layout == "column-major" else "C"


def _perm(layer) -> list[int]:
    """The axes of the (B-expanded) array in (B, C, the rest in format order) order."""
    fmt = layer.format if layer.has_batch else "B" + layer.format
    return [fmt.index("B"), fmt.index("C")] + [i for i, ch in enumerate(fmt) if ch not in "BC"]


def to_nc(flat, layer, batch: int, sizes=()) -> np.ndarray:
    """A flat buffer in the layer's layout as a float64 (N, C, ...) array for PyTorch."""
    a = np.reshape(np.asarray(flat, dtype=np.float64), _shape(layer, batch, sizes),
                   order=_order(layer))
    if not layer.has_batch:
        a = a[None]
    a = np.transpose(a, _perm(layer))
    return np.ascontiguousarray(a if a.ndim > 2 else a[..., None])


def from_nc(a: np.ndarray, layer, batch: int, sizes=()) -> np.ndarray:
    """The inverse of to_nc: a flat float64 buffer in the layer's layout."""
    shape = _shape(layer, batch, sizes)
    nd = len(shape) + (0 if layer.has_batch else 1)
    a = np.asarray(a).reshape(a.shape[:nd]) if a.ndim > nd else np.asarray(a)
    a = np.transpose(a, np.argsort(_perm(layer)))
    if not layer.has_batch:
        a = a[0]
    return np.ravel(a, order=_order(layer))


def torch_train(layer, act, inp: dict, batch: int, sizes=()) -> dict:
    """y, the saved statistics and the gradients of L = sum(y * dy) by torch.autograd, in
    float64 from the same values the C took."""
    nobs = batch if layer.has_batch else 1
    c, groups = layer.num_channels, layer.num_groups

    def nc(flat, grad=False):
        return torch.from_numpy(to_nc(flat, layer, batch, sizes)).requires_grad_(grad)

    def leaf(values):
        return torch.tensor(np.asarray(values, dtype=np.float64)).requires_grad_(True)

    x = nc(inp["x"], True)
    v = x
    if layer.skip:
        skip = nc(inp["skip"], True)
        v = x + skip
    vg = v.detach().reshape(nobs, groups, -1)
    mean = vg.mean(dim=2)
    rstd = 1.0 / torch.sqrt(vg.var(dim=2, unbiased=False) + layer.epsilon)
    scale, offset = leaf(inp["scale"]), leaf(inp["offset"])
    z = F.group_norm(v, groups, scale, offset, layer.epsilon)
    if layer.adaptive:
        gain, shift = leaf(inp["ada_scale"]), leaf(inp["ada_shift"])
        bshape = (nobs, c) + (1,) * (z.ndim - 2)
        z = z * (1 + gain.reshape(bshape)) + shift.reshape(bshape)
    y = act(z)
    (y * nc(inp["dy"])).sum().backward()

    def flat(t):
        return from_nc(t.detach().numpy(), layer, batch, sizes)

    out = dict(y=flat(y), mean=mean.numpy().reshape(-1), rstd=rstd.numpy().reshape(-1),
               dx=flat(x.grad), dscale=scale.grad.numpy(), doffset=offset.grad.numpy())
    if layer.skip:
        out["dskip"] = flat(skip.grad)
    if layer.adaptive:
        out.update(dada_scale=gain.grad.numpy(), dada_shift=shift.grad.numpy())
    return out


def inputs(layer, batch: int, seed: int, sizes=(), x_mean=0.5, x_sd=2.0) -> dict:
    """Random inputs in the layer's storage type: x, dy, scale, offset, skip, ada_*."""
    dt = np.float64 if layer.dtype == "double" else np.float32
    rng = np.random.default_rng(seed)
    fixed = layer.at_sizes(sizes) if layer.runtime_sizes else layer
    nobs = batch if layer.has_batch else 1
    n, c = fixed.observation_numel * nobs, layer.num_channels
    out = dict(x=rng.normal(x_mean, x_sd, n), dy=rng.normal(0.0, 1.0, n),
               scale=rng.normal(1.0, 0.5, c), offset=rng.normal(0.0, 0.5, c))
    if layer.skip:
        out["skip"] = rng.normal(-0.3, 1.0, n)
    if layer.adaptive:
        out["ada_scale"] = rng.normal(0.0, 0.5, nobs * c)
        out["ada_shift"] = rng.normal(0.0, 0.5, nobs * c)
    return {k: np.asarray(v).astype(dt) for k, v in out.items()}


def close(got, want, what: str, rtol: float) -> None:
    """Assert max |got - want| <= rtol * max |want| (no NaN, same length)."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    assert np.all(np.isfinite(got)), f"{what}: {np.count_nonzero(~np.isfinite(got))} not finite"
    scale = float(np.max(np.abs(want))) if want.size else 0.0
    err = float(np.max(np.abs(got - want))) if want.size else 0.0
    assert err <= rtol * scale, f"{what}: max error {err:.3g} > {rtol:g} * {scale:.3g}"


def check_against_torch(lib: Lib, act_name: str, batch: int, seed=0, sizes=(), **draw):
    layer = lib.layer
    assert layer.has_batch or batch == 1, "a format without B takes batch 1"
    inp = inputs(layer, batch, seed, sizes, **draw)
    got = lib.step(inp, batch, sizes)
    want = torch_train(layer, ACTIVATIONS[act_name][1], inp, batch, sizes)
    rtol = RTOL[layer.dtype]
    keys = ["y", "mean", "rstd", "dx", "dscale", "doffset"]
    if layer.adaptive:
        keys += ["dada_scale", "dada_shift"]
    for key in keys:
        close(got[key], want[key], f"{layer.name}: {key}", rtol)
    if layer.skip:
        close(got["dx"], want["dskip"], f"{layer.name}: dskip", rtol)
        np.testing.assert_array_equal(got["sum"], (inp["x"] + inp["skip"]).astype(lib.np))
    # the gradients are not trivially small: the comparison means something
    assert np.max(np.abs(want["dx"])) > 1e-2 and np.max(np.abs(want["dscale"])) > 1e-2
    return inp, got, want


# --------------------------------------------------------------------------- against autograd


def _batches(ids: list[str], no_batch) -> list[tuple[str, int]]:
    """(id, batch) pairs: batch 1 and 3, only 1 where the format has no B."""
    return [(i, b) for i in ids for b in (1, 3) if b == 1 or not no_batch(i)]


FORMAT_IDS = [f"{f}-{SHORT[lay]}" for f, _, _ in FORMATS for lay in LAYOUTS]


@pytest.mark.parametrize("fmt_id,batch", _batches(FORMAT_IDS, lambda i: "B" not in i.split("-")[0]))
def test_every_format_and_layout_matches_autograd(fmt_id, batch):
    fmt = fmt_id.split("-")[0]
    lib = _lib(f"fmt:{fmt_id}", f"fmt:{fmt}-col", f"fmt:{fmt}-row")
    check_against_torch(lib, "none", batch, seed=batch)


def test_layout_conversion_is_not_the_identity():
    """The oracle's layout conversion reorders (else layouts would go untested)."""
    layer = _lib("fmt:BSSC-row", "fmt:BSSC-col", "fmt:BSSC-row").layer
    flat = np.arange(2 * layer.observation_numel, dtype=np.float64)
    nc = to_nc(flat, layer, 2)
    assert nc.shape == (2, 12, 4, 3)
    assert nc[0, 1, 0, 0] == 1.0 and nc[0, 0, 0, 1] == 12.0       # C fastest (NHWC)
    np.testing.assert_array_equal(from_nc(nc, layer, 2), flat)
    col = _lib("fmt:BSSC-col", "fmt:BSSC-col", "fmt:BSSC-row").layer
    assert to_nc(flat, col, 2)[1, 0, 0, 0] == 1.0                  # B fastest


@pytest.mark.parametrize("fmt_id", ["SSC-col", "SSC-row"])
def test_no_batch_format_refuses_batch(fmt_id):
    """A format without B holds one observation: batch 3 is ERR_BATCH, nothing written."""
    fmt = fmt_id.split("-")[0]
    lib = _lib(f"fmt:{fmt_id}", f"fmt:{fmt}-col", f"fmt:{fmt}-row")
    inp = inputs(lib.layer, 1, 0)
    n, g, c = lib.layer.observation_numel, lib.layer.num_groups, lib.layer.num_channels
    x, y, mean, rstd = lib.own(inp["x"]), lib.out(n), lib.out(3 * g), lib.out(3 * g)
    s, o = lib.own(inp["scale"]), lib.own(inp["offset"])
    rc = lib.fn("forward_train")(lib.p(x), lib.p(y), 3, lib.p(s), lib.p(o), lib.p(mean),
                                 lib.p(rstd))
    lib.check("forward_train", rc, ERR_BATCH)
    assert np.all(np.isnan(y)) and np.all(np.isnan(mean)) and np.all(np.isnan(rstd))
    ok = lib.step(inp, 1)
    ds, do, dx = lib.out(c), lib.out(c), lib.out(n)
    rc = lib.fn("backward")(lib.p(lib.own(inp["x"])), lib.p(lib.own(inp["dy"])), lib.p(dx),
                            lib.p(ds), lib.p(do), 3, lib.p(s), lib.p(o),
                            lib.p(lib.own(np.tile(ok["mean"], 3))),
                            lib.p(lib.own(np.tile(ok["rstd"], 3))))
    lib.check("backward", rc, ERR_BATCH)
    assert np.all(np.isnan(dx)) and np.all(np.isnan(ds)) and np.all(np.isnan(do))


ACT_GROUP = tuple(f"act:{a}" for a in ACTIVATIONS)


@pytest.mark.parametrize("act", list(ACTIVATIONS))
def test_every_activation_matches_autograd(act):
    lib = _lib(f"act:{act}", *ACT_GROUP)
    check_against_torch(lib, act, 2, seed=11)
    if act != "none":
        # z four times wider: every region (above the ceiling of 6, the saturated tails)
        inp = inputs(lib.layer, 2, 12, x_sd=3.0)
        inp["scale"] = (inp["scale"] * 4.0).astype(np.float32)
        got = lib.step(inp, 2)
        want = torch_train(lib.layer, ACTIVATIONS[act][1], inp, 2)
        for key in ("y", "dx", "dscale", "doffset"):
            close(got[key], want[key], f"{act} wide: {key}", RTOL["single"])


FUSION_IDS = [f"{f}/{s}" for f in FUSIONS for s in FUSION_SHAPES]


@pytest.mark.parametrize("fusion_id,batch",
                         _batches(FUSION_IDS,
                                  lambda i: i.split("/")[1] in ("SC-row", "SSC-blocks")))
def test_fusions_match_autograd(fusion_id, batch):
    fusion, shape = fusion_id.split("/")
    lib = _lib(f"fusion:{fusion_id}", *(f"fusion:{fusion}/{s}" for s in FUSION_SHAPES))
    check_against_torch(lib, FUSION_ACT[fusion], batch, seed=3 + batch)


@pytest.mark.parametrize("which", list(RUNTIME))
def test_runtime_sizes_match_autograd_at_two_sizes(which):
    lib = _lib(f"runtime:{which}")
    act = RUNTIME[which][2]
    for sizes in RUNTIME[which][1]:
        for batch in (1, 3):
            check_against_torch(lib, act, batch, seed=sizes[0] + batch, sizes=sizes)


@pytest.mark.parametrize("act", [*ACTIVATIONS, "all"])
def test_double_matches_autograd_to_1e_12(act):
    """Every activation in double (each its own build), and skip + modulation + swish."""
    lib = _lib(f"double:{act}")
    assert lib.np == np.float64
    act = "swish" if act == "all" else act
    for batch in (1, 3):
        check_against_torch(lib, act, batch, seed=20 + batch)


# --------------------------------------------------------------------------- numerics classes

NUMERICS = {
    "mean-1e4": dict(x_mean=1e4, x_sd=1.0),
    "tiny-var-0": dict(x_mean=0.0, x_sd=1e-3),
    "tiny-var-1e3": dict(x_mean=1e3, x_sd=1e-3),
    "tiny-eps": dict(x_mean=1e3, x_sd=1e-3),        # epsilon 1e-9: the variance counts
}
NUMERIC_GROUP = tuple(f"numerics:{k}" for k in ("plain", "tiny-eps"))


def _against_reference(lib: Lib, inp: dict, batch: int, got: dict, rtol=RTOL["single"]):
    layer = lib.layer
    ref = reference_backward(layer, inp["x"], inp["dy"], batch, inp["scale"], inp["offset"],
                             skip=inp.get("skip"), ada_scale=inp.get("ada_scale"),
                             ada_shift=inp.get("ada_shift"))
    for key in ("dx", "dscale", "doffset"):
        close(got[key], ref[key], f"{layer.name}: {key} vs reference", rtol)
    mean, rstd = train_statistics(inp["x"], layer, batch, skip=inp.get("skip"))
    close(got["rstd"], rstd, f"{layer.name}: rstd vs reference", rtol)
    close(got["mean"], mean, f"{layer.name}: mean vs reference", rtol)
    # each saved mean within a unit in its last place, or rtol of its group's deviation
    err = np.abs(got["mean"].astype(np.float64) - mean)
    bound = np.spacing(np.abs(mean).astype(lib.np)).astype(np.float64) + rtol / rstd
    assert np.all(err <= bound), f"{layer.name}: mean off by {np.max(err / bound):.3g} bounds"


@pytest.mark.parametrize("case", list(NUMERICS))
def test_numerics_classes(case):
    lib = _lib("numerics:tiny-eps" if case == "tiny-eps" else "numerics:plain", *NUMERIC_GROUP)
    batch = 2
    inp, got, _ = check_against_torch(lib, "none", batch, seed=30, **NUMERICS[case])
    _against_reference(lib, inp, batch, got)
    if case == "tiny-eps":
        # with epsilon 1e-9 rstd is the variance's, about 1e3 (not epsilon's 3e4)
        assert 300 < float(np.min(got["rstd"])) and float(np.max(got["rstd"])) < 3000


def test_constant_groups():
    """Groups whose values are all equal (variance 0): x^ = 0, y = offset, rstd =
    1/sqrt(epsilon), dx = rstd * (dx^ - mean dx^)."""
    lib = _lib("numerics:plain", *NUMERIC_GROUP)
    layer, batch = lib.layer, 3
    inp = inputs(layer, batch, 31)
    nc = to_nc(inp["x"], layer, batch)
    cpg = layer.channels_per_group
    nc[0, :cpg] = 3.0                     # observation 0, group 0
    nc[2, cpg:2 * cpg] = -1e4             # observation 2, group 1 (a large constant)
    nc[1, :] = 0.0                        # every group of observation 1
    inp["x"] = from_nc(nc, layer, batch).astype(np.float32)
    got = lib.step(inp, batch)
    want = torch_train(layer, ACTIVATIONS["none"][1], inp, batch)
    for key in ("y", "mean", "rstd", "dx", "dscale", "doffset"):
        close(got[key], want[key], f"constant: {key}", RTOL["single"])
    _against_reference(lib, inp, batch, got)
    g = layer.num_groups
    for n, grp in ((0, 0), (2, 1), (1, 0), (1, 1)):
        assert got["rstd"][n * g + grp] == pytest.approx(1 / np.sqrt(layer.epsilon), rel=1e-6)
    y = to_nc(got["y"], layer, batch)
    np.testing.assert_allclose(y[1], np.broadcast_to(inp["offset"][:, None, None], y[1].shape),
                               rtol=0, atol=1e-6)


def test_a_large_group():
    """64 x 64 x 8 channels = 32768 elements per group, two groups, batch 2."""
    lib = _lib("large")
    batch = 2
    inp, got, _ = check_against_torch(lib, "none", batch, seed=40)
    _against_reference(lib, inp, batch, got)


# --------------------------------------------------------------------------- threads


@pytest.mark.parametrize("which", list(THREAD_SHAPES))
def test_threads_give_the_same_bits(which):
    one = _lib(f"threads:1/{which}", f"threads:1/{which}", f"threads:2/{which}")
    two = _lib(f"threads:2/{which}", f"threads:1/{which}", f"threads:2/{which}")
    batch = 8
    assert batch * one.layer.observation_numel >= 1 << 16     # OpenMP runs at this size
    inp = inputs(one.layer, batch, 50)
    a, b = one.step(inp, batch), two.step(inp, batch)
    for key in a:
        if a[key] is not None:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    # and both are right
    want = torch_train(one.layer, ACTIVATIONS["gelu" if which == "all" else "none"][1], inp,
                       batch)
    for key in ("y", "dx", "dscale", "doffset"):
        close(a[key], want[key], f"threads {which}: {key}", RTOL["single"])


def test_threads_build_is_parallel():
    """The threads: 2 build's sources ask OpenMP for 2 threads in backward (the bit-equality
    test above would pass trivially otherwise)."""
    lib = _lib("threads:2/nchw", "threads:1/nchw", "threads:2/nchw")
    one = _lib("threads:1/nchw", "threads:1/nchw", "threads:2/nchw")
    sources = render_c(lib.plan, "test.yaml")
    text = next(s.text for s in sources if s.name.endswith(".c"))
    body = text[text.index(f"int {lib.prefix}_backward("):]
    assert "num_threads(2)" in body[:body.index("\n}\n")]
    text1 = next(s.text for s in render_c(one.plan, "test.yaml") if s.name.endswith(".c"))
    assert "num_threads" not in text1


# --------------------------------------------------------------------------- solvers

SOLVER_GROUP = tuple(f"solver:{k}" for k in SOLVER_FACTORS)
HYPER = {
    "sgdm": dict(learn_rate=0.1, momentum=0.9, l2_regularization=0.01),
    "adam": dict(step=3, learn_rate=0.5, beta1=0.9, beta2=0.999, epsilon=1e-8,
                 l2_regularization=0.01),
    "rmsprop": dict(learn_rate=0.05, rho=0.9, epsilon=1e-8, l2_regularization=0.01),
}
STATE = {"sgdm": ("velocity",), "adam": ("m", "v"), "rmsprop": ("sq",)}


def matlab_update(solver: str, p, state: dict, dp, lr_factor, l2_factor, h: dict) -> tuple:
    """MATLAB's update of one parameter, written out in float64: (p, state) after it.

    sgdmupdate:    g = dp + L2 * f2 * p; vel = momentum * vel - lr * f1 * g; p = p + vel
    adamupdate:    m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2;
                   p = p - lr f1 sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + epsilon)
    rmspropupdate: sq = rho sq + (1 - rho) g^2; p = p - lr f1 g / (sqrt(sq) + epsilon)
    """
    p = np.asarray(p, np.float64)
    dp = np.asarray(dp, np.float64)
    state = {k: np.asarray(v, np.float64) for k, v in state.items()}
    if lr_factor == 0:
        return p, state
    lr = h["learn_rate"] * lr_factor
    g = dp + h["l2_regularization"] * l2_factor * p
    if solver == "sgdm":
        vel = h["momentum"] * state["velocity"] - lr * g
        return p + vel, {"velocity": vel}
    if solver == "adam":
        b1, b2, t = h["beta1"], h["beta2"], h["step"]
        m = b1 * state["m"] + (1 - b1) * g
        v = b2 * state["v"] + (1 - b2) * g * g
        corrected = lr * np.sqrt(1 - b2 ** t) / (1 - b1 ** t)
        return p - corrected * m / (np.sqrt(v) + h["epsilon"]), {"m": m, "v": v}
    sq = h["rho"] * state["sq"] + (1 - h["rho"]) * g * g
    return p - lr * g / (np.sqrt(sq) + h["epsilon"]), {"sq": sq}


def _solver_arrays(lib: Lib, solver: str, seed: int) -> dict:
    """scale, offset, their states and gradients, drawn at random (storage type)."""
    rng = np.random.default_rng(seed)
    c = lib.layer.num_channels

    def draw(sd=1.0, mean=0.0, positive=False):
        v = rng.normal(mean, sd, c)
        return (np.abs(v) if positive else v).astype(lib.np)

    arrays = {"scale": draw(0.3, 1.0), "offset": draw(0.3), "dscale": draw(), "doffset": draw()}
    for which in ("scale", "offset"):
        for st in STATE[solver]:
            arrays[f"{which}_{st}"] = draw(0.1, positive=st in ("v", "sq"))
    return arrays


def _solve(lib: Lib, solver: str, arrays: dict, hyper: dict, null: str | None = None,
           want: int = OK) -> dict:
    """Call one update on guarded copies of the arrays (null: the one passed as NULL);
    return the arrays after it."""
    out = {k: lib.own(v) for k, v in arrays.items()}
    names = ["scale", "offset"] + [f"{w}_{st}" for st in STATE[solver]
                                   for w in ("scale", "offset")] + ["dscale", "doffset"]
    rc = lib.fn(f"{solver}_update")(*(lib.ffi.NULL if n == null else lib.p(out[n])
                                      for n in names), *hyper.values())
    lib.check(f"{solver}_update", rc, want)
    return out


def _factor(factors: str, which: str, kind: str) -> float:
    key = f"{which.capitalize()}{'LearnRate' if kind == 'lr' else 'L2'}Factor"
    return float(SOLVER_FACTORS[factors].get(key, 1.0))


@pytest.mark.parametrize("solver", list(HYPER))
@pytest.mark.parametrize("factors", list(SOLVER_FACTORS))
def test_solvers_follow_matlab(solver, factors):
    lib = _lib(f"solver:{factors}", *SOLVER_GROUP)
    seed = list(HYPER).index(solver) * 10 + list(SOLVER_FACTORS).index(factors)
    arrays = _solver_arrays(lib, solver, seed)
    got = _solve(lib, solver, arrays, HYPER[solver])
    for which in ("scale", "offset"):
        lr_f, l2_f = _factor(factors, which, "lr"), _factor(factors, which, "l2")
        state = {st: arrays[f"{which}_{st}"] for st in STATE[solver]}
        p, new_state = matlab_update(solver, arrays[which], state, arrays[f"d{which}"], lr_f,
                                     l2_f, HYPER[solver])
        if lr_f == 0:
            # frozen: the parameter and its solver state keep their bits
            np.testing.assert_array_equal(got[which], arrays[which], err_msg=which)
            for st in STATE[solver]:
                np.testing.assert_array_equal(got[f"{which}_{st}"], arrays[f"{which}_{st}"],
                                              err_msg=f"{which}_{st}")
            continue
        # the step itself, to float32's precision of the parameter (steps are ~1e-2)
        delta_got = got[which].astype(np.float64) - arrays[which]
        delta_want = p - arrays[which]
        assert np.max(np.abs(delta_want)) > 1e-2, "the step is too small to check"
        close(delta_got, delta_want, f"{solver} {factors}: {which} step", 5e-4)
        for st in STATE[solver]:
            close(got[f"{which}_{st}"], new_state[st], f"{solver} {factors}: {which}_{st}", 5e-6)
    for k in ("dscale", "doffset"):         # the gradients are inputs only
        np.testing.assert_array_equal(got[k], arrays[k])


def test_frozen_scale_stays_over_steps_while_offset_moves():
    """ScaleLearnRateFactor 0 over three steps of each solver."""
    lib = _lib("solver:frozen-scale", *SOLVER_GROUP)
    for solver in HYPER:
        start = _solver_arrays(lib, solver, seed=7)
        arrays = start
        for step in range(1, 4):
            arrays = _solve(lib, solver, arrays,
                            dict(HYPER[solver], **({"step": step} if solver == "adam" else {})))
        np.testing.assert_array_equal(arrays["scale"], start["scale"])
        assert np.all(arrays["offset"] != start["offset"]), solver
        for st in STATE[solver]:
            np.testing.assert_array_equal(arrays[f"scale_{st}"], start[f"scale_{st}"])
            assert np.all(arrays[f"offset_{st}"] != start[f"offset_{st}"]), (solver, st)


def test_factor_macros_and_initial_parameters_in_the_header():
    lib = _lib("solver:factors", *SOLVER_GROUP)
    m = lib.prefix.upper()
    for macro, value in (("SCALE_LEARN_RATE_FACTOR", 2.0), ("OFFSET_LEARN_RATE_FACTOR", 0.25),
                         ("SCALE_L2_FACTOR", 3.0), ("OFFSET_L2_FACTOR", 0.5)):
        line = next((ln for ln in lib.header.splitlines()
                     if ln.startswith(f"#define {m}_{macro} ")), None)
        assert line is not None, macro
        assert float(line.split()[2].rstrip("f")) == value, line
    c = lib.layer.num_channels
    assert f"extern const float {lib.prefix}_initial_scale[{c}];" in lib.header
    assert f"extern const float {lib.prefix}_initial_offset[{c}];" in lib.header


def test_adam_step_zero_is_refused_and_changes_nothing():
    lib = _lib("solver:default", *SOLVER_GROUP)
    arrays = _solver_arrays(lib, "adam", seed=8)
    got = _solve(lib, "adam", arrays, dict(HYPER["adam"], step=0), want=ERR_STEP)
    for k in arrays:
        np.testing.assert_array_equal(got[k], arrays[k], err_msg=k)
    moved = _solve(lib, "adam", arrays, dict(HYPER["adam"], step=1))
    assert np.all(moved["scale"] != arrays["scale"])


@pytest.mark.parametrize("solver", list(HYPER))
def test_solver_null_pointers(solver):
    lib = _lib("solver:default", *SOLVER_GROUP)
    arrays = _solver_arrays(lib, solver, seed=9)
    for name in arrays:
        got = _solve(lib, solver, arrays, HYPER[solver], null=name, want=ERR_NULL)
        for k in arrays:
            np.testing.assert_array_equal(got[k], arrays[k], err_msg=f"NULL {name}: {k}")


ALL_GROUP = tuple(f"fusion:all/{s}" for s in FUSION_SHAPES)


@pytest.mark.parametrize("name", ["fusion:all/SSCB-col", "fmt:SSCB-col"])
def test_forward_and_backward_null_pointers(name):
    lib = _lib(name, *(ALL_GROUP if name.startswith("fusion") else
                       ("fmt:SSCB-col", "fmt:SSCB-row")))
    lay, batch = lib.layer, 2
    inp = inputs(lay, batch, 60)
    ok = lib.step(inp, batch)
    c, g, n = lay.num_channels, lay.num_groups, inp["x"].size
    fusion = (["skip", "sum"] if lay.skip else []) + (
        ["ada_scale", "ada_shift"] if lay.adaptive else [])
    fwd = ["x", "y", "scale", "offset", *fusion, "mean", "rstd"]
    written = {"y": n, "sum": n, "mean": batch * g, "rstd": batch * g}
    for null in fwd:
        if null == "sum":
            continue                      # a NULL sum is allowed: no sum is written
        bufs = {k: lib.own(inp[k]) for k in inp} | {k: lib.out(v) for k, v in written.items()}
        args = [lib.ffi.NULL if k == null else lib.p(bufs[k]) for k in fwd]
        lib.check("forward_train", lib.fn("forward_train")(*args[:2], batch, *args[2:]),
                  ERR_NULL)
        for k in written:
            assert np.all(np.isnan(bufs[k])), f"NULL {null}: {k} written"
    dada = ["dada_scale", "dada_shift"] if lay.adaptive else []
    outs = ["x", "dy", "dx", "dscale", "doffset", *dada]
    ins = ["scale", "offset", *(["skip"] if lay.skip else []),
           *(["ada_scale", "ada_shift"] if lay.adaptive else []), "mean", "rstd"]
    written = {"dx": n, "dscale": c, "doffset": c} | {k: batch * c for k in dada}
    for null in outs + ins:
        bufs = ({k: lib.own(inp[k]) for k in inp} | {k: lib.out(v) for k, v in written.items()}
                | {"mean": lib.own(ok["mean"]), "rstd": lib.own(ok["rstd"])})
        args = [lib.ffi.NULL if k == null else lib.p(bufs[k]) for k in outs + ins]
        rc = lib.fn("backward")(*args[:len(outs)], batch, *args[len(outs):])
        lib.check("backward", rc, ERR_NULL)
        for k in written:
            assert np.all(np.isnan(bufs[k])), f"NULL {null}: {k} written"


def test_forward_train_without_sum():
    """A skip layer's forward_train with sum NULL writes y and the statistics all the same."""
    lib = _lib("fusion:skip/SSCB-col", *(f"fusion:skip/{s}" for s in FUSION_SHAPES))
    inp = inputs(lib.layer, 2, 61)
    with_sum = lib.forward_train(inp, 2)
    without = lib.forward_train(inp, 2, want_sum=False)
    assert without["sum"] is None
    for k in ("y", "mean", "rstd"):
        np.testing.assert_array_equal(with_sum[k], without[k], err_msg=k)


# --------------------------------------------------------------------------- in place


@pytest.mark.parametrize("name", ["fusion:all/BSSC-row", "fmt:BCSS-row", "act:clipped-relu"])
def test_dx_in_place_of_dy(name):
    group = (ALL_GROUP if name.startswith("fusion") else ACT_GROUP if name.startswith("act")
             else ("fmt:BCSS-col", "fmt:BCSS-row"))
    lib = _lib(name, *group)
    lay, batch = lib.layer, 3
    inp = inputs(lay, batch, 70)
    sep = lib.step(inp, batch)
    # forward_train in place (y == x; skip's sum not asked for) writes what a separate y holds
    x = lib.own(inp["x"])
    stats = batch * lay.num_groups
    mean, rstd = lib.out(stats), lib.out(stats)
    fusion = ([lib.p(lib.own(inp["skip"])), lib.ffi.NULL] if lay.skip else []) + (
        [lib.p(lib.own(inp["ada_scale"])), lib.p(lib.own(inp["ada_shift"]))]
        if lay.adaptive else [])
    rc = lib.fn("forward_train")(lib.p(x), lib.p(x), batch, lib.p(lib.own(inp["scale"])),
                                 lib.p(lib.own(inp["offset"])), *fusion, lib.p(mean),
                                 lib.p(rstd))
    lib.check("forward_train", rc)
    for key, got in (("y", x), ("mean", mean), ("rstd", rstd)):
        np.testing.assert_array_equal(got, sep[key], err_msg=f"in place: {key}")
    # backward with dx == dy
    dy = lib.own(inp["dy"])
    got = lib.backward(inp, batch, sep["mean"], sep["rstd"], dx=dy, dy=dy)
    assert got["dx"] is dy
    for key in ("dx", "dscale", "doffset") + (("dada_scale", "dada_shift")
                                             if lay.adaptive else ()):
        np.testing.assert_array_equal(got[key], sep[key], err_msg=f"in place: {key}")


# --------------------------------------------------------------------------- training


def test_sgdm_fits_scale_and_offset():
    """Fit scale and offset to a target layer's output with SGDM through the C: L = 1/2
    sum((y - t)^2), dy = y - t, from the spec's ones and zeros; 50 steps cut the loss at
    least tenfold."""
    lib = _lib("fit")
    lay, batch = lib.layer, 4
    rng = np.random.default_rng(80)
    c = lay.num_channels
    x = rng.normal(0.0, 1.5, batch * lay.observation_numel).astype(np.float32)
    target = lib.forward_train(dict(x=x, scale=rng.normal(1.0, 0.6, c),
                                    offset=rng.normal(0.0, 0.6, c)), batch)["y"].copy()
    scale, offset = lib.own(np.ones(c)), lib.own(np.zeros(c))
    vs, vo = lib.own(np.zeros(c)), lib.own(np.zeros(c))
    per_channel = batch * lay.observation_numel // c
    losses = []
    for _ in range(50):
        inp = dict(x=x, scale=scale.copy(), offset=offset.copy())
        fwd = lib.forward_train(inp, batch)
        err = fwd["y"].astype(np.float64) - target
        losses.append(0.5 * float(np.sum(err * err)))
        inp["dy"] = err
        grads = lib.backward(inp, batch, fwd["mean"], fwd["rstd"])
        ds, do = lib.own(grads["dscale"]), lib.own(grads["doffset"])
        rc = lib.fn("sgdm_update")(lib.p(scale), lib.p(offset), lib.p(vs), lib.p(vo), lib.p(ds),
                                   lib.p(do), 0.5 / per_channel, 0.9, 0.0)
        lib.check("sgdm_update", rc)
    assert losses[0] > 1.0
    assert losses[-1] * 10 <= losses[0], losses[::10]
