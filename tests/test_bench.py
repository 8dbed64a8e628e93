"""benchmarks/bench_cpu.py runs end to end and prints the table the README documents."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_cpu", REPO / "benchmarks" / "bench_cpu.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_cpu"] = module
    spec.loader.exec_module(module)
    return module


def test_cases_cover_both_layouts_and_every_shape(bench):
    rows = [(c.shape, c.layout) for c in bench.cases(list(bench.SHAPES))]
    assert ("E", "NCHW") in rows and ("E", "NHWC") not in rows     # no spatial dims
    for s in "ABCDF":
        assert (s, "NCHW") in rows and (s, "NHWC") in rows
    f = next(c for c in bench.cases(["F"]) if c.layout == "NHWC")
    assert "format: BSC" in f.spec_text(1) and "input_size: [128, 256]" in f.spec_text(1)


def test_generated_c_computes_group_norm(bench):
    """The benchmarked build is the real kernel: compare it with NumPy on shape A."""
    for case in bench.cases(["A"]):
        plan, lib, ffi = bench.build(case, 1)
        rng = np.random.default_rng(3)
        x_nchw = rng.standard_normal((case.n, case.c, *case.spatial)).astype(np.float32)
        x = (np.ascontiguousarray(np.moveaxis(x_nchw, 1, -1)) if case.layout == "NHWC"
             else x_nchw).ravel().copy()
        y = np.empty_like(x)
        fn = getattr(lib, f"{plan.prefix}_predict")
        assert fn(ffi.from_buffer("float[]", x), ffi.from_buffer("float[]", y), case.n) == 0
        want = bench.numpy_runner(x_nchw.astype(np.float64), case)().reshape(x_nchw.shape)
        if case.layout == "NHWC":
            want = np.moveaxis(want, 1, -1)
        assert np.abs(y - want.ravel()).max() < 1e-5


def test_quick_run_prints_every_column(bench, capsys):
    assert bench.main(["--shapes", "A", "--quick"]) == 0
    out = capsys.readouterr().out.splitlines()
    header = next(line for line in out if line.lstrip().startswith("shape"))
    for column in ("C 1t", "GB/s", "C 2t", "best 1->2t", "torch 1t", "torch 2t", "ORT", "NumPy",
                   "torch1t/C", "floor hot", "C cold", "floor cold", "cold/floor"):
        assert column in header
    rows = [line.split() for line in out if line.split()[:1] == ["A"]]
    assert [r[1] for r in rows] == ["NCHW", "NHWC"]
    assert all(float(r[2]) > 0 for r in rows)                      # C 1t
    assert rows[0][9] != "-" and rows[1][9] == "-"                 # ORT only on NCHW


def test_unknown_shape_is_a_usage_error(bench):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--shapes", "Z"])
    assert exc.value.code == 2


def test_runtime_sizes_table_times_both_builds(bench, capsys):
    """--runtime-sizes: each layout of a shape built with its spatial sizes at run time, timed
    beside the fixed build, PyTorch and the floor, through the kernel the rules pick."""
    assert bench.main(["--shapes", "A,E", "--quick", "--runtime-sizes"]) == 0
    out = capsys.readouterr().out.splitlines()
    header = next(line for line in out if line.lstrip().startswith("shape")).split()
    for column in ("fixed", "runtime", "runtime/fixed", "torch/runtime", "runtime/floor"):
        assert column in header
    rows = [line.split() for line in out if line.split()[:1] == ["A"]]
    assert [r[1] for r in rows] == ["NCHW", "NHWC"]               # E has no spatial size
    assert [r[-1] for r in rows] == ["runs", "rows"]
    assert all(float(r[3]) > 0 and float(r[4]) > 0 for r in rows)


def test_train_table_times_the_step_beside_pytorch_and_the_floors(bench, capsys):
    """--train: forward_train + backward of each layout beside PyTorch's forward + backward
    and the floors, in one run."""
    assert bench.main(["--shapes", "A", "--quick", "--train"]) == 0
    out = capsys.readouterr().out.splitlines()
    header = next(line for line in out if line.lstrip().startswith("shape")).split()
    for column in ("fwd", "bwd", "step", "torch/C", "bwd/floor", "step/floor"):
        assert column in header
    rows = [line.split() for line in out if line.split()[:1] == ["A"]]
    assert [r[1] for r in rows] == ["NCHW", "NHWC"]
    assert all(float(v) > 0 for r in rows for v in r[2:])


def test_benchmarked_backward_is_the_real_one(bench):
    """The training build the benchmark times computes the layer's gradients."""
    from gncodegen.training import reference_backward
    for case in bench.cases(["A"]):
        plan, lib, ffi = bench.build(case, 1, training=True)
        rng = np.random.default_rng(5)
        x = rng.standard_normal(case.numel).astype(np.float32)
        dy = rng.standard_normal(case.numel).astype(np.float32)
        y, dx = np.empty_like(x), np.empty_like(x)
        mean = np.empty(case.n * case.g, np.float32)
        rstd = np.empty_like(mean)
        ds, do = np.empty(case.c, np.float32), np.empty(case.c, np.float32)
        one, zero = np.ones(case.c, np.float32), np.zeros(case.c, np.float32)
        buf = lambda a: ffi.from_buffer("float[]", a)   # noqa: E731
        assert getattr(lib, f"{plan.prefix}_forward_train")(
            buf(x), buf(y), case.n, buf(one), buf(zero), buf(mean), buf(rstd)) == 0
        assert getattr(lib, f"{plan.prefix}_backward")(
            buf(x), buf(dy), buf(dx), buf(ds), buf(do), case.n, buf(one), buf(zero), buf(mean),
            buf(rstd)) == 0
        ref = reference_backward(plan.layer, x, dy, case.n, one, zero)
        for got, key in ((dx, "dx"), (ds, "dscale"), (do, "doffset")):
            assert np.abs(got - ref[key]).max() <= 2e-5 * np.abs(ref[key]).max(), key
