"""`pip install .` (a real wheel, not editable) ships the templates and the CLI works from it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from conftest import EXAMPLES, REPO


@pytest.mark.slow
def test_cli_from_wheel_in_fresh_venv(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(REPO),
                    "-w", str(wheels)], check=True, capture_output=True)
    (wheel,) = wheels.glob("gncodegen-*.whl")
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", str(wheel)], check=True,
                   capture_output=True)
    work = tmp_path / "work"          # away from the source tree, so nothing leaks in from it
    work.mkdir()
    shutil.copy(EXAMPLES / "matlab_gn.yaml", work)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["GNCODEGEN_CACHE"] = str(tmp_path / "cache")
    where = subprocess.run([str(py), "-c", "import gncodegen.render as r; print(r.template_dir())"],
                           cwd=work, env=env, capture_output=True, text=True, check=True)
    assert str(env_dir) in where.stdout, where.stdout     # the wheel's copy, not the checkout's
    proc = subprocess.run([str(env_dir / "bin" / "gncodegen"), "build", "matlab_gn.yaml"],
                          cwd=work, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = work / "generated" / "matlab_gn"
    assert (out / "matlab_gn.c").is_file() and (out / "manifest.json").is_file()
    assert Path(REPO / "generated" / "matlab_gn" / "matlab_gn.c").read_text() == \
        (out / "matlab_gn.c").read_text()
