"""Sanitizers: the generated C under AddressSanitizer + UBSan and valgrind.

The layers' sources are compiled with a small C driver (not cffi: a sanitizer runtime inside a
Python extension is unreliable) into one executable. The driver reads a job list, allocates
every buffer at exactly its size (so one element too far is a heap overflow ASan reports), runs
each layer out of place, in place, with the caller's parameters, at batch 1 and batch > 1,
checks the error codes for NULL pointers and impossible batches, and writes the outputs; the
test compares them with the float64 reference. Any sanitizer report aborts with a non-zero
status (-fno-sanitize-recover=all); valgrind runs a plain build with --error-exitcode=1.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import make_layer
from gncodegen.build import STRICT_WARNINGS
from gncodegen.plan import lower
from gncodegen.targets.c.kernel import THREADS
from gncodegen.dtypes import DTYPES, round_to_dtype
from gncodegen.reference import group_norm_reference
from gncodegen.targets.c import render_c
from gncodegen.verify import compare

# (name, keys): shapes chosen to reach every loop shape of the kernel: a contiguous group,
# channels last, strides beyond B (T after B), one-element groups, no B, a large group with
# threads, odd sizes that leave vector remainders.
LAYERS = [
    ("sscb", dict(num_groups=3, format="SSCB", input_size=[7, 5, 6])),
    ("nchw_f64", dict(num_groups=2, format="BCSS", layout="row-major", input_size=[6, 9, 11],
                      dtype="double")),
    ("nhwc", dict(num_groups=4, format="BSSC", layout="row-major", input_size=[5, 3, 8])),
    ("cbt", dict(num_groups=3, format="CBT", input_size=[12, 33])),
    ("channelwise", dict(num_groups="channel-wise", format="CB", input_size=[16])),
    ("no_batch", dict(num_groups=3, format="SSC", input_size=[9, 7, 6])),
    ("tcub_f64", dict(num_groups=2, format="TCUB", layout="row-major", input_size=[17, 4, 3],
                      dtype="double")),
    ("big_threads", dict(num_groups=1, format="SSCB", input_size=[67, 61, 2], threads=2)),
]

DRIVER = r"""
/* Sanitizer driver: runs jobs "<layer> <mode> <batch> <x> <y> [<scale> <offset>]" from a file. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
%(includes)s

static void *load(const char *path, size_t bytes)
{
    void *p = malloc(bytes ? bytes : 1);
    FILE *f = fopen(path, "rb");
    if (!p || !f || fread(p, 1, bytes, f) != bytes) { fprintf(stderr, "cannot read %%s\n", path); exit(3); }
    fclose(f);
    return p;
}

static void save(const char *path, const void *p, size_t bytes)
{
    FILE *f = fopen(path, "wb");
    if (!f || fwrite(p, 1, bytes, f) != bytes) { fprintf(stderr, "cannot write %%s\n", path); exit(3); }
    fclose(f);
}

#define CHECK(cond) do { if (!(cond)) { fprintf(stderr, "%%s:%%d: %%s failed\n", name, __LINE__, #cond); return 1; } } while (0)

%(runners)s

int main(int argc, char **argv)
{
    char name[64], mode[16], x[512], y[512], s[512], o[512];
    size_t batch;
    int failed = 0;
    FILE *jobs = argc > 1 ? fopen(argv[1], "r") : NULL;
    if (!jobs) { fprintf(stderr, "usage: driver JOBS\n"); return 2; }
    while (fscanf(jobs, "%%63s %%15s %%zu %%511s %%511s %%511s %%511s", name, mode, &batch, x, y, s, o) == 7) {
        int found = 0;
%(dispatch)s
        if (!found) { fprintf(stderr, "unknown layer %%s\n", name); return 2; }
    }
    fclose(jobs);
    return failed;
}
"""

RUNNER = r"""
static int run_%(p)s(const char *name, const char *mode, size_t batch, const char *xp,
                     const char *yp, const char *sp, const char *op)
{
    const size_t n = batch * %(M)s_OBSERVATION_NUMEL, bytes = n * sizeof(%(T)s);
    const size_t pbytes = %(M)s_NUM_CHANNELS * sizeof(%(T)s);
    %(T)s *x = load(xp, bytes);
    %(T)s *scale = load(sp, pbytes);
    %(T)s *offset = load(op, pbytes);
    %(T)s *y = strcmp(mode, "inplace") == 0 || strcmp(mode, "inplace_params") == 0 ? x : malloc(bytes ? bytes : 1);
    CHECK(y != NULL);
    /* Refusals touch nothing. */
    CHECK(%(p)s_predict(NULL, y, batch) == %(M)s_ERR_NULL);
    CHECK(%(p)s_predict(x, NULL, batch) == %(M)s_ERR_NULL);
    CHECK(%(p)s_predict_with_params(x, y, batch, NULL, offset) == %(M)s_ERR_NULL);
    CHECK(%(p)s_predict_with_params(x, y, batch, scale, NULL) == %(M)s_ERR_NULL);
    CHECK(%(p)s_predict(x, y, (size_t)-1) == %(M)s_ERR_BATCH);
%(batch_check)s
    if (strstr(mode, "params")) {
        CHECK(%(p)s_predict_with_params(x, y, batch, scale, offset) == %(M)s_OK);
    } else {
        CHECK(%(p)s_predict(x, y, batch) == %(M)s_OK);
    }
    save(yp, y, bytes);
    if (y != x) free(y);
    free(x);
    free(scale);
    free(offset);
    return 0;
}
"""

NO_BATCH_CHECK = "    CHECK({p}_predict(x, y, 2) == {M}_ERR_BATCH);\n    CHECK({p}_predict(x, y, 0) == {M}_ERR_BATCH);"
ZERO_BATCH_CHECK = "    CHECK({p}_predict(x, y, 0) == {M}_OK); /* nothing to do, nothing touched */"


def layers():
    """Return the plans of the sanitizer layers."""
    return [lower(make_layer(name=name, scale_initializer="narrow-normal",
                             offset_initializer="narrow-normal", **keys))
            for name, keys in LAYERS]


def write_driver(folder: Path, plans) -> list[str]:
    """Write the layers' sources and the driver into folder; return the .c file names."""
    for plan in plans:
        for src in render_c(plan, "sanitizers.yaml"):
            (folder / src.name).write_text(src.text)
    runners, dispatch = [], []
    for plan in plans:
        check = (NO_BATCH_CHECK if not plan.has_batch else ZERO_BATCH_CHECK).format(
            p=plan.prefix, M=plan.macro)
        runners.append(RUNNER % dict(p=plan.prefix, M=plan.macro, T=plan.dtype.spelling.ctype,
                                     batch_check=check))
        dispatch.append(f'        if (strcmp(name, "{plan.prefix}") == 0) {{ found = 1; '
                        f'failed |= run_{plan.prefix}(name, mode, batch, x, y, s, o); }}')
    includes = "\n".join(f'#include "{p.prefix}.h"' for p in plans)
    (folder / "driver.c").write_text(DRIVER % dict(includes=includes, runners="".join(runners),
                                                   dispatch="\n".join(dispatch)))
    return ["driver.c", *(f"{p.prefix}.c" for p in plans)]


def build(folder: Path, plans, flags: list[str]) -> Path:
    """Compile the driver and every layer with flags; return the executable."""
    sources = write_driver(folder, plans)
    openmp = ["-fopenmp"] if any(THREADS.value(p.layer) > 1 for p in plans) else []
    cmd = ["cc", "-std=c99", *STRICT_WARNINGS, *flags, *openmp, "-I.", *sources, "-lm", "-o",
           "driver"]
    proc = subprocess.run(cmd, cwd=folder, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr}"
    return folder / "driver"


def make_jobs(folder: Path, plans) -> list[tuple]:
    """Write inputs and the job list; return (plan, mode, batch, x, scale, offset, y path)."""
    rng = np.random.default_rng(11)
    jobs, lines = [], []
    for plan in plans:
        layer = plan.layer
        np_t = np.dtype(plan.dtype.numpy)
        modes = [("out", 1), ("out", 3), ("inplace", 3), ("params", 2), ("inplace_params", 1)]
        if not plan.has_batch:
            modes = [(m, 1) for m, _ in modes]
        for i, (mode, batch) in enumerate(modes):
            x = round_to_dtype(rng.normal(5.0, 2.0, batch * layer.observation_numel), layer.dtype)
            if "params" in mode:
                scale = round_to_dtype(rng.normal(1.0, 0.5, layer.num_channels), layer.dtype)
                offset = round_to_dtype(rng.normal(0.0, 0.5, layer.num_channels), layer.dtype)
            else:
                scale = np.asarray(plan.scale_values)
                offset = np.asarray(plan.offset_values)
            stem = folder / f"{plan.prefix}_{i}"
            paths = [Path(f"{stem}.{k}") for k in ("x", "y", "s", "o")]
            for path, values in zip([paths[0], paths[2], paths[3]], [x, scale, offset]):
                path.write_bytes(values.astype(np_t).tobytes())
            lines.append(f"{plan.prefix} {mode} {batch} {paths[0]} {paths[1]} {paths[2]} {paths[3]}")
            jobs.append((plan, mode, batch, x, scale, offset, paths[1]))
    (folder / "jobs.txt").write_text("\n".join(lines) + "\n")
    return jobs


def check_outputs(jobs) -> None:
    """Assert every job's output matches the reference within the dtype's tolerance."""
    for plan, mode, batch, x, scale, offset, ypath in jobs:
        y = np.frombuffer(ypath.read_bytes(), dtype=plan.dtype.numpy).astype(np.float64)
        ref = group_norm_reference(x, plan.layer, batch, scale, offset)
        res = compare(y, ref, DTYPES[plan.layer.dtype].tolerance, mode)
        assert res.passed, f"{plan.prefix} {mode} batch {batch}: {res}"


def run_driver(cmd: list[str], folder: Path, env: dict | None = None):
    """Run the driver; return the completed process."""
    return subprocess.run(cmd, cwd=folder, capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


SANITIZE = ["-g", "-fsanitize=address,undefined", "-fno-omit-frame-pointer",
            "-fno-sanitize-recover=all"]


@pytest.mark.parametrize("opt", ["-O2", "-Os"], ids=["fast-O2", "compact-Os"])
def test_asan_ubsan_clean(tmp_path: Path, opt: str):
    """ASan + UBSan: no report on any layer, mode or batch, and correct outputs."""
    plans = layers()
    exe = build(tmp_path, plans, [opt, *SANITIZE])
    jobs = make_jobs(tmp_path, plans)
    env = {"ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0:exitcode=99",
           "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1:exitcode=98",
           "OMP_NUM_THREADS": "2"}
    proc = run_driver([str(exe), "jobs.txt"], tmp_path, env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "runtime error" not in proc.stderr and "Sanitizer" not in proc.stderr, proc.stderr
    check_outputs(jobs)


def test_sanitizer_catches_an_overflow(tmp_path: Path):
    """The harness can fail: a driver that reads one element past x is reported by ASan."""
    plans = layers()[:1]
    sources = write_driver(tmp_path, plans)
    driver = (tmp_path / "driver.c").read_text()
    marker = "    save(yp, y, bytes);"
    assert marker in driver
    (tmp_path / "driver.c").write_text(driver.replace(
        marker, "    y[0] = x[n];  /* one element past the end */\n" + marker, 1))
    cmd = ["cc", "-std=c99", "-O1", *SANITIZE, "-I.", *sources, "-lm", "-o", "driver"]
    assert subprocess.run(cmd, cwd=tmp_path, capture_output=True, timeout=300).returncode == 0
    make_jobs(tmp_path, plans)
    proc = run_driver([str(tmp_path / "driver"), "jobs.txt"], tmp_path)
    assert proc.returncode != 0 and "heap-buffer-overflow" in proc.stderr


def test_valgrind_memcheck_clean(tmp_path: Path):
    """valgrind memcheck on a plain -O2 build: no invalid access, no uninitialised use, no leak."""
    valgrind = shutil.which("valgrind")
    assert valgrind, "valgrind is part of the test environment (scripts/install-toolchains.sh)"
    plans = layers()
    exe = build(tmp_path, plans, ["-O2", "-g"])
    jobs = make_jobs(tmp_path, plans)
    proc = run_driver([valgrind, "--error-exitcode=1", "--leak-check=full",
                       "--errors-for-leak-kinds=definite,indirect", "--track-origins=yes",
                       "-q", str(exe), "jobs.txt"], tmp_path, {"OMP_NUM_THREADS": "2"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    check_outputs(jobs)
