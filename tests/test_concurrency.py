"""Concurrency: the generated C called from 8 threads at once on different
buffers gives bit-identical results to serial calls.

Two ways in: Python threads through cffi (API mode releases the GIL around the call, so the C
really runs in parallel), and a pthread C driver built with ThreadSanitizer, which also reports
any data race (the C has no mutable globals, so there must be none).
"""

from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest

from conftest import build_layers, make_layer
from gncodegen.build import STRICT_WARNINGS
from gncodegen.plan import lower
from gncodegen.dtypes import round_to_dtype
from gncodegen.targets.c import render_c

THREADS = 8
ROUNDS = 25
SHAPES = [
    ("cc_sscb", dict(num_groups=4, format="SSCB", input_size=[13, 11, 8])),
    ("cc_nhwc_f64", dict(num_groups=2, format="BSSC", layout="row-major", input_size=[6, 5, 8],
                         dtype="double")),
    ("cc_cbt", dict(num_groups=3, format="CBT", input_size=[9, 21])),
    ("cc_big", dict(num_groups=2, format="SSCB", input_size=[64, 48, 4])),
]
OPENMP_SHAPE = ("cc_omp", dict(num_groups=2, format="SSCB", input_size=[64, 48, 4], threads=2))


def _bits(a: np.ndarray) -> np.ndarray:
    """Return the raw bits of a float array (so NaN payloads and -0.0 compare too)."""
    return a.view(np.uint64 if a.dtype == np.float64 else np.uint32)


def _layers(shapes):
    return [make_layer(name=name, scale_initializer="narrow-normal",
                       offset_initializer="narrow-normal", **keys) for name, keys in shapes]


@pytest.mark.parametrize("in_place", [False, True], ids=["out-of-place", "in-place"])
def test_python_threads_bit_identical(in_place: bool):
    """8 Python threads hammering every layer through cffi match the serial results bit for bit."""
    plans, module = build_layers(*_layers([*SHAPES, OPENMP_SHAPE]))
    ffi, lib = module.ffi, module.lib
    rng = np.random.default_rng(5)
    work = []
    for plan in plans:
        layer = plan.layer
        np_t = np.dtype(plan.dtype.numpy)
        batch = 3 if layer.has_batch else 1
        fn = getattr(lib, f"{plan.prefix}_predict")
        ct = f"{plan.dtype.spelling.ctype}[]"
        inputs = [round_to_dtype(rng.normal(t, 1.0 + t, batch * layer.observation_numel),
                                 layer.dtype).astype(np_t) for t in range(THREADS)]
        serial = []
        for x in inputs:
            y = np.empty_like(x)
            assert fn(ffi.from_buffer(ct, x), ffi.from_buffer(ct, y), batch) == 0
            serial.append(y)
        work.append((plan, fn, ct, batch, inputs, serial))

    barrier = threading.Barrier(THREADS)
    errors: list[str] = []

    def worker(t: int) -> None:
        try:
            barrier.wait()
            for _ in range(ROUNDS):
                for plan, fn, ct, batch, inputs, serial in work:
                    x = inputs[t].copy()
                    y = x if in_place else np.full_like(x, np.nan)
                    rc = fn(ffi.from_buffer(ct, x), ffi.from_buffer(ct, y), batch)
                    if rc != 0 or not np.array_equal(_bits(y), _bits(serial[t])):
                        errors.append(f"thread {t}, {plan.prefix}: rc {rc} or bits differ")
                        return
        except Exception as exc:  # reported below, with the thread that raised it
            errors.append(f"thread {t}: {exc!r}")

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors[:5]


DRIVER = r"""
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
%(includes)s

#define THREADS %(threads)d
#define ROUNDS %(rounds)d

typedef struct { int t; int failed; } job_t;
static pthread_barrier_t start;

%(bodies)s

static void *worker(void *arg)
{
    job_t *job = arg;
    pthread_barrier_wait(&start);
    for (int r = 0; r < ROUNDS; ++r) {
%(calls)s
    }
    return NULL;
}

int main(void)
{
    pthread_t th[THREADS];
    job_t jobs[THREADS];
%(serial)s
    pthread_barrier_init(&start, NULL, THREADS);
    for (int t = 0; t < THREADS; ++t) {
        jobs[t].t = t;
        jobs[t].failed = 0;
        if (pthread_create(&th[t], NULL, worker, &jobs[t]) != 0) return 3;
    }
    int failed = 0;
    for (int t = 0; t < THREADS; ++t) {
        pthread_join(th[t], NULL);
        failed |= jobs[t].failed;
    }
    printf("%%s\n", failed ? "DIFFER" : "IDENTICAL");
    return failed;
}
"""

BODY = r"""
#define %(P)s_N (%(B)d * %(M)s_OBSERVATION_NUMEL)
static %(T)s %(P)s_x[THREADS][%(P)s_N], %(P)s_serial[THREADS][%(P)s_N];

static void %(P)s_fill(void)
{
    unsigned s = 12345u;
    for (int t = 0; t < THREADS; ++t) {
        for (size_t i = 0; i < %(P)s_N; ++i) {
            s = s * 1103515245u + 12345u;
            %(P)s_x[t][i] = (%(T)s)((double)(s >> 8) / 16777216.0 * (t + 1) - 0.5 * t);
        }
        if (%(p)s_predict(%(P)s_x[t], %(P)s_serial[t], %(B)d) != 0) exit(4);
    }
}

static int %(P)s_check(int t, int in_place)
{
    /* Each thread's own buffers, on its stack's side of the heap. */
    %(T)s *x = malloc(sizeof(%(T)s) * %(P)s_N);
    %(T)s *y = in_place ? x : malloc(sizeof(%(T)s) * %(P)s_N);
    memcpy(x, %(P)s_x[t], sizeof(%(T)s) * %(P)s_N);
    int bad = %(p)s_predict(x, y, %(B)d) != 0
              || memcmp(y, %(P)s_serial[t], sizeof(%(T)s) * %(P)s_N) != 0;
    if (y != x) free(y);
    free(x);
    return bad;
}
"""


def test_pthreads_under_thread_sanitizer(tmp_path: Path):
    """8 pthreads at once, in and out of place: bit-identical to serial, and TSan sees no race."""
    plans = [lower(layer) for layer in _layers(SHAPES)]
    for plan in plans:
        for src in render_c(plan, "concurrency.yaml"):
            (tmp_path / src.name).write_text(src.text)
    bodies, calls, serial = [], [], []
    for plan in plans:
        batch = 2 if plan.has_batch else 1
        args = dict(p=plan.prefix, P=plan.prefix.upper(), M=plan.macro, T=plan.dtype.spelling.ctype,
                    B=batch)
        bodies.append(BODY % args)
        calls.append(f"        job->failed |= {args['P']}_check(job->t, r & 1);")
        serial.append(f"    {args['P']}_fill();")
    (tmp_path / "driver.c").write_text(DRIVER % dict(
        includes="\n".join(f'#include "{p.prefix}.h"' for p in plans), threads=THREADS,
        rounds=ROUNDS, bodies="".join(bodies), calls="\n".join(calls), serial="\n".join(serial)))
    sources = ["driver.c", *(f"{p.prefix}.c" for p in plans)]
    cmd = ["cc", "-std=gnu99", "-O2", "-g", "-fsanitize=thread", *STRICT_WARNINGS,
           "-I.", *sources, "-lm", "-pthread", "-o", "driver"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr}"
    env = {**os.environ, "TSAN_OPTIONS": "halt_on_error=1:exitcode=66"}
    run = subprocess.run([str(tmp_path / "driver")], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300, env=env)
    assert "ThreadSanitizer" not in run.stderr, run.stderr
    assert run.returncode == 0 and run.stdout.strip() == "IDENTICAL", run.stdout + run.stderr
