"""The output folder's CMakeLists.txt and the rule for several targets in one folder: a C-only
consumer installs the layers and finds them with find_package, without CUDA; a later build of
another target keeps the first's files; --target takes a list."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from gncodegen.cli import main

from conftest import EXAMPLES

needs_cmake = pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not on PATH")

CONSUMER = """\
cmake_minimum_required(VERSION 3.16)
project(consumer LANGUAGES C)
find_package(matlab_gn REQUIRED)
add_executable(app_static main.c)
target_link_libraries(app_static PRIVATE matlab_gn::matlab_gn)
add_executable(app_shared main.c)
target_link_libraries(app_shared PRIVATE matlab_gn::matlab_gn_shared)
"""
MAIN = """\
#include <stdio.h>
#include "matlab_gn.h"
static float x[MATLAB_GN_OBSERVATION_NUMEL], y[MATLAB_GN_OBSERVATION_NUMEL];
int main(void)
{
    for (int i = 0; i < MATLAB_GN_OBSERVATION_NUMEL; ++i) {
        x[i] = (float)(i % 13) - 6.0f;
    }
    const int rc = matlab_gn_predict(x, y, 1);
    double sum = 0.0;
    for (int i = 0; i < MATLAB_GN_OBSERVATION_NUMEL; ++i) {
        sum += (double)y[i] * y[i];
    }
    printf("rc %d mean square %.3f\\n", rc, sum / MATLAB_GN_OBSERVATION_NUMEL);
    return rc;
}
"""


def _build(spec: Path, out: Path, target: str) -> str:
    result = CliRunner().invoke(main, ["build", str(spec), "-o", str(out), "--target", target,
                                       "--cuda-runner", "emulation"])
    assert result.exit_code == 0, result.output
    return result.output


def _run(cmd, **kw):
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False, **kw)
    assert done.returncode == 0, " ".join(map(str, cmd)) + "\n" + done.stdout + done.stderr
    return done.stdout


@needs_cmake
def test_a_c_only_consumer_finds_the_installed_layers(tmp_path):
    out = tmp_path / "out"
    _build(EXAMPLES / "matlab_gn.yaml", out, "c")
    build, prefix = tmp_path / "build", tmp_path / "prefix"
    _run(["cmake", "-S", str(out), "-B", str(build)])
    cache = (build / "CMakeCache.txt").read_text()
    assert "CMAKE_CUDA_COMPILER" not in cache          # no .cu here: CUDA is never looked for
    _run(["cmake", "--build", str(build)])
    _run(["cmake", "--install", str(build), "--prefix", str(prefix)])
    installed = sorted(str(p.relative_to(prefix)) for p in prefix.rglob("*") if p.is_file())
    assert "include/matlab_gn.h" in installed and "lib/libmatlab_gn.a" in installed
    assert "lib/libmatlab_gn.so" in installed
    assert any(p.endswith("cmake/matlab_gn/matlab_gnConfig.cmake") for p in installed)

    consumer = tmp_path / "consumer"
    consumer.mkdir()
    (consumer / "CMakeLists.txt").write_text(CONSUMER)
    (consumer / "main.c").write_text(MAIN)
    cbuild = tmp_path / "consumer-build"
    _run(["cmake", "-S", str(consumer), "-B", str(cbuild), f"-DCMAKE_PREFIX_PATH={prefix}"])
    _run(["cmake", "--build", str(cbuild)])
    for app in ("app_static", "app_shared"):
        printed = _run([str(cbuild / app)])
        assert printed.startswith("rc 0 mean square 1.000"), printed   # unit variance
    linked = _run(["ldd", str(cbuild / "app_shared")])
    assert "libmatlab_gn.so" in linked
    assert "cudart" not in linked and "libstdc++" not in linked


@needs_cmake
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
def test_a_folder_with_cuda_sources_adds_the_cuda_library(tmp_path):
    out = tmp_path / "out"
    _build(EXAMPLES / "matlab_gn.yaml", out, "all")
    build = tmp_path / "build"
    _run(["cmake", "-S", str(out), "-B", str(build), "-DCMAKE_CUDA_ARCHITECTURES=80"])
    assert "matlab_gn_cuda" in (build / "Makefile").read_text() or \
        (build / "CMakeFiles" / "matlab_gn_cuda.dir").is_dir()


def test_every_target_writes_the_same_cmake_lists(tmp_path):
    texts = set()
    for target in ("c", "cuda", "cortex-m4"):
        out = tmp_path / target
        _build(EXAMPLES / "matlab_gn.yaml", out, target)
        texts.add((out / "CMakeLists.txt").read_bytes())
    assert len(texts) == 1


def test_a_later_build_of_another_target_keeps_the_first(tmp_path):
    out = tmp_path / "out"
    spec = EXAMPLES / "matlab_gn.yaml"
    _build(spec, out, "all")
    printed = _build(spec, out, "cortex-m4")
    assert "kept the files of c, cuda from the earlier build of this spec" in printed
    names = {p.name for p in out.iterdir()}
    assert {"matlab_gn.c", "matlab_gn.cu", "matlab_gn_cuda.h", "fw_demo.c",
            "cortex-m4.cmake"} <= names
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["targets"] == ["c", "cuda", "cortex-m4"]
    assert set(manifest["files"]) == names - {"manifest.json"}
    assert {v["target"] for v in manifest["verification"]} == {"c", "cuda", "cortex-m4"}
    assert "cuda" in manifest and "cortex-m4" in manifest
    # the folder is still ours: the next build replaces it
    _build(spec, out, "c")


def test_a_build_of_another_spec_says_what_it_removed(tmp_path):
    out = tmp_path / "out"
    spec = tmp_path / "s.yaml"
    spec.write_text((EXAMPLES / "matlab_gn.yaml").read_text())
    _build(spec, out, "cuda")
    spec.write_text(spec.read_text().replace("Epsilon: 1e-5", "Epsilon: 1e-4"))
    printed = _build(spec, out, "c")
    assert "removed the files of cuda: they were built from another spec" in printed
    assert not (out / "matlab_gn.cu").exists()


def test_retrained_parameters_are_another_build(tmp_path):
    """The same spec file with another parameter file renders other sources: not kept."""
    import numpy as np
    out = tmp_path / "out"
    spec = tmp_path / "p.yaml"
    np.save(tmp_path / "scale.npy", np.full(20, 2.0, np.float32))
    spec.write_text((EXAMPLES / "matlab_gn.yaml").read_text().replace(
        "ScaleInitializer: ones", "Scale: {file: scale.npy}"))
    _build(spec, out, "cuda")
    np.save(tmp_path / "scale.npy", np.full(20, 5.0, np.float32))
    printed = _build(spec, out, "c")
    assert "removed the files of cuda" in printed and not (out / "matlab_gn.cu").exists()


def test_a_kept_file_that_went_missing_is_no_crash(tmp_path):
    out = tmp_path / "out"
    _build(EXAMPLES / "matlab_gn.yaml", out, "c,cuda")
    (out / "matlab_gn.cu").unlink()
    # the CUDA build is no longer whole: not kept, and said so
    printed = _build(EXAMPLES / "matlab_gn.yaml", out, "c")
    assert "removed the files of cuda" in printed
    assert not (out / "matlab_gn_cuda.h").exists()


def test_target_takes_a_comma_list_and_names_an_unknown_one(tmp_path):
    out = tmp_path / "out"
    _build(EXAMPLES / "matlab_gn.yaml", out, "c,cortex-m4,c")
    assert json.loads((out / "manifest.json").read_text())["targets"] == ["c", "cortex-m4"]
    bad = CliRunner().invoke(main, ["build", str(EXAMPLES / "matlab_gn.yaml"), "-o",
                                    str(tmp_path / "x"), "--target", "c,cortex-m99"])
    assert bad.exit_code != 0 and not (tmp_path / "x").exists()
    lines = bad.output.strip().splitlines()
    assert len(lines) == 1 and "unknown target 'cortex-m99'" in lines[0], bad.output
    helped = CliRunner().invoke(main, ["build", "--help"])
    assert "all = c, cuda" in helped.output and "firmware = cortex-m0" in helped.output
