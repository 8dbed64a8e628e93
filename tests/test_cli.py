"""The command line: build, verify, show, --version; atomic, deterministic output."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner

from gncodegen import __version__, dtypes
from gncodegen.cli import main

from conftest import EXAMPLES


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture
def example(tmp_path):
    """A copy of the MATLAB example spec in a scratch folder."""
    path = tmp_path / "matlab_gn.yaml"
    shutil.copy(EXAMPLES / "matlab_gn.yaml", path)
    return path


def test_version():
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output


def test_build_writes_sources_and_manifest(example, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["build", str(example), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "matlab_gn  c" in result.output and "pass" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["CMakeLists.txt", "manifest.json",
                                                     "matlab_gn.c", "matlab_gn.h", "report.html"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["generator"] == f"gncodegen {__version__}"
    assert manifest["spec"]["sha256"] == hashlib.sha256(example.read_bytes()).hexdigest()
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest
    (ver,) = manifest["verification"]
    assert ver["passed"] and ver["target"] == "c" and 0 < ver["max_rel_error"] <= 1e-5
    assert {"random, batch 1", "random, in place", "constant groups"} <= set(ver["cases"])


def test_default_output_folder_is_generated_stem(example, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["build", str(example), "--no-verify"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "generated" / "matlab_gn" / "matlab_gn.c").is_file()
    assert "not verified" in result.output


def test_same_spec_gives_same_bytes(example, tmp_path):
    for out in ("a", "b"):
        assert CliRunner().invoke(main, ["build", str(example), "-o",
                                         str(tmp_path / out)]).exit_code == 0
    assert _snapshot(tmp_path / "a") == _snapshot(tmp_path / "b")


def test_rebuild_replaces_previous_output(example, tmp_path):
    out = tmp_path / "out"
    assert CliRunner().invoke(main, ["build", str(example), "-o", str(out)]).exit_code == 0
    example.write_text(example.read_text().replace("NumGroups: 4", "NumGroups: 5"))
    assert CliRunner().invoke(main, ["build", str(example), "-o", str(out)]).exit_code == 0
    assert "#define MATLAB_GN_NUM_GROUPS 5" in (out / "matlab_gn.h").read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no leftovers


def test_failed_verification_writes_nothing(example, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert CliRunner().invoke(main, ["build", str(example), "-o", str(out)]).exit_code == 0
    before = _snapshot(out)
    example.write_text(example.read_text().replace("NumGroups: 4", "NumGroups: 2"))
    single = dtypes.DTYPES["single"]
    monkeypatch.setitem(dtypes.DTYPES, "single", dataclasses.replace(single, tolerance=0.0))
    result = CliRunner().invoke(main, ["build", str(example), "-o", str(out)])
    assert result.exit_code == 1
    assert "FAIL" in result.output and "nothing was written" in result.output
    assert _snapshot(out) == before


def test_foreign_folder_is_not_clobbered(example, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    result = CliRunner().invoke(main, ["build", str(example), "-o", str(out)])
    assert result.exit_code == 2
    assert "output: " in result.output and "did not write" in result.output
    assert _snapshot(out) == {"notes.txt": b"keep me"}


def test_verify_writes_nothing(example, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["verify", str(example)])
    assert result.exit_code == 0, result.output
    assert "host" in result.output and "pass" in result.output
    assert not (tmp_path / "generated").exists()


def test_show_prints_layer_and_plan():
    result = CliRunner().invoke(main, ["show", str(EXAMPLES / "multi_layer.yaml")])
    assert result.exit_code == 0, result.output
    assert "layer encoder_gn" in result.output and "layer decoder_gn_f64" in result.output
    assert "memory order, fastest first" in result.output
    assert "1 (all-channels)" in result.output


def test_cuda_target_availability_is_stated(example, tmp_path):
    result = CliRunner().invoke(main, ["build", str(example), "--target", "cuda", "-o",
                                       str(tmp_path / "o")])
    if result.exit_code == 2:   # until the CUDA target lands
        assert "cuda" in result.output and "not available" in result.output
        assert not (tmp_path / "o").exists()
    else:
        assert result.exit_code == 0, result.output
        assert (tmp_path / "o" / "matlab_gn.cu").is_file()


def test_bad_target_is_a_usage_error(example):
    result = CliRunner().invoke(main, ["build", str(example), "--target", "z80"])
    assert result.exit_code == 2 and "z80" in result.output


def test_installed_entry_point_runs(example, tmp_path):
    """The console script is installed and reports errors without a traceback."""
    exe = shutil.which("gncodegen")
    assert exe, "the gncodegen console script is not on PATH"
    ok = subprocess.run([exe, "verify", str(example)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("num_groups: 3\nformat: CB\ninput_size: [4]\n")
    proc = subprocess.run([exe, "build", str(bad), "-o", str(tmp_path / "o")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: num_groups: 3 does not divide num_channels 4"
    assert "Traceback" not in proc.stderr + proc.stdout and not (tmp_path / "o").exists()


def test_python_dash_m(example):
    proc = subprocess.run([sys.executable, "-m", "gncodegen", "--version"], capture_output=True,
                          text=True)
    assert proc.returncode == 0 and __version__ in proc.stdout
