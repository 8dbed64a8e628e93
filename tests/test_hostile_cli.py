"""The command line against a hostile user: odd SPEC and -o paths, usage errors, Ctrl-C, and
initializer code that misbehaves. Every refusal is one line `error: <field>: <rule>` on stderr
with status 2 (130 for Ctrl-C), no traceback, and no byte of an existing output changed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import slow_cc

CLI = [sys.executable, "-P", "-m", "gncodegen.cli"]
SPEC = "name: layer\nnum_groups: 2\nformat: CB\ninput_size: [4]\n"


def tree(root: Path) -> dict[str, bytes | str]:
    """Return every path under root with its bytes (folders as '/', links as targets)."""
    out: dict[str, bytes | str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = os.fsdecode(p.relative_to(root))
            out[rel] = ("-> " + os.readlink(p) if p.is_symlink() else
                        "/" if p.is_dir() else "fifo" if p.is_fifo() else p.read_bytes())
    return out


def env_for(root: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "GNCODEGEN_CACHE": str(root / ".cache"),
            "PYTHONDONTWRITEBYTECODE": "1", **extra}


def cli(root: Path, *args: str, timeout: float = 120, **extra: str):
    return subprocess.run([*CLI, *args], cwd=root, env=env_for(root, **extra),
                          capture_output=True, text=True, timeout=timeout)


def refused(proc, field: str, *words: str, status: int = 2) -> str:
    """Assert one line `error: <field>: ...` holding words, and the status; return it."""
    text = proc.stdout + proc.stderr
    assert "Traceback" not in text, text
    assert proc.returncode == status, text
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: {field}: "), lines[0]
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def scene(tmp_path: Path) -> Path:
    """A folder with layer.yaml and out/, an output of an earlier build."""
    (tmp_path / "layer.yaml").write_text(SPEC)
    proc = cli(tmp_path, "build", "layer.yaml", "-o", "out", "--no-verify")
    assert proc.returncode == 0, proc.stderr
    return tmp_path


def test_spec_that_is_a_folder(scene: Path):
    (scene / "specs").mkdir()
    before = tree(scene)
    for command in (["build", "specs", "--no-verify", "-o", "out"], ["show", "specs"],
                    ["verify", "specs"]):
        refused(cli(scene, *command), "spec", "not a regular file", "is a folder")
    assert tree(scene) == before


def test_output_that_is_a_file(scene: Path):
    (scene / "notes.txt").write_text("keep")
    before = tree(scene)
    refused(cli(scene, "build", "layer.yaml", "-o", "notes.txt", "--no-verify"),
            "output", "notes.txt exists and is not a folder")
    assert tree(scene) == before


@pytest.mark.parametrize("out,words", [
    ("", ["the folder name is empty"]),
    ("x" * 300, ["longer than 255 bytes"]),
    ("a/" + "y" * 300 + "/b", ["longer than 255 bytes"]),
    ("/".join(["d"] * 2100), ["longer than 4096 bytes"]),
    (".", ["holds files gncodegen did not write"]),
    ("..", ["holds files gncodegen did not write"]),
    ("layer.yaml/inside", ["is not a folder"]),
])
def test_odd_output_paths(scene: Path, out: str, words: list[str]):
    before = tree(scene)
    refused(cli(scene, "build", "layer.yaml", "-o", out, "--no-verify"), "output", *words)
    assert tree(scene) == before


def test_device_and_fifo_specs_do_not_hang(scene: Path):
    os.mkfifo(scene / "pipe.yaml")
    before = tree(scene)
    started = time.monotonic()
    refused(cli(scene, "show", "/dev/zero", timeout=30), "spec", "/dev/zero is a device")
    refused(cli(scene, "show", "pipe.yaml", timeout=30), "spec", "pipe.yaml is a FIFO")
    refused(cli(scene, "build", "pipe.yaml", "-o", "out", timeout=30), "spec", "is a FIFO")
    assert time.monotonic() - started < 30
    assert tree(scene) == before


def test_spec_name_not_utf8_and_output_name_not_utf8(scene: Path):
    bad = os.fsdecode(b"lay\xffer.yaml")
    (scene / bad).write_text(SPEC)
    refused(cli(scene, "show", bad), "spec", "byte 0xff, which is not UTF-8")
    out = os.fsdecode(b"out\xfe")       # a folder name that is not UTF-8 is only a name
    proc = cli(scene, "build", "layer.yaml", "-o", out, "--no-verify")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "\\udcfe" in proc.stdout and (scene / out / "layer.h").is_file()


@pytest.mark.parametrize("args,words", [
    (["build"], ["Missing argument 'SPEC'"]),
    (["build", "layer.yaml", "--frobnicate"], ["--frobnicate"]),
    (["bogus"], ["bogus"]),
])
def test_usage_errors_are_one_line(scene: Path, args: list[str], words: list[str]):
    before = tree(scene)
    refused(cli(scene, *args), "usage", *words)
    assert tree(scene) == before


def test_an_unknown_target_is_one_line_naming_the_option(scene: Path):
    before = tree(scene)
    refused(cli(scene, "build", "layer.yaml", "--target", "c,z80"), "--target",
            "unknown target 'z80'", "several separated by commas")
    assert tree(scene) == before


def test_help_and_version_still_work(tmp_path: Path):
    for args in (["--help"], ["build", "--help"], ["--version"]):
        proc = cli(tmp_path, *args)
        assert proc.returncode == 0 and proc.stdout and not proc.stderr, proc.stderr


# --------------------------------------------------------------------------- Ctrl-C


def test_ctrl_c_while_compiling_exits_130(scene: Path):
    """SIGINT to the process group (a terminal's Ctrl-C) while the compiler runs."""
    (scene / "layer.yaml").write_text(SPEC.replace("num_groups: 2", "num_groups: 4"))
    extra, mark = slow_cc(scene)
    before = tree(scene / "out")
    proc = subprocess.Popen([*CLI, "build", "layer.yaml", "-o", "out"], cwd=scene,
                            env=env_for(scene, **extra), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not mark.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "compiler never ran"
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err
    assert err == "error: interrupted\n"
    assert tree(scene / "out") == before
    assert sorted(p.name for p in scene.iterdir() if p.name.startswith(".out")) == []


INTERRUPT_WRITE = r"""
import sys
import gncodegen.output as output
calls = []
real = output._write_file
def write(path, text):
    calls.append(path)
    if len(calls) == 2:
        raise KeyboardInterrupt
    real(path, text)
output._write_file = write
from gncodegen.cli import main
sys.argv = ["gncodegen", *sys.argv[1:]]
main()
"""


def test_ctrl_c_while_writing_leaves_the_old_output(scene: Path):
    (scene / "layer.yaml").write_text(SPEC.replace("num_groups: 2", "num_groups: 4"))
    before = tree(scene / "out")
    proc = subprocess.run([sys.executable, "-P", "-c", INTERRUPT_WRITE, "build", "layer.yaml",
                           "-o", "out", "--no-verify"], cwd=scene, env=env_for(scene),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 130 and proc.stderr == "error: interrupted\n", proc.stderr
    assert tree(scene / "out") == before
    assert [p.name for p in scene.iterdir() if p.name.startswith(".out")] == []


# --------------------------------------------------------------------------- user code


@pytest.mark.parametrize("module,words,status", [
    ("raise RuntimeError('boom')\n", ["importing module 'gn_user'", "RuntimeError: boom"], 2),
    ("def init(:\n", ["importing module 'gn_user'", "SyntaxError"], 2),
    ("import sys\nsys.exit(0)\n", ["importing module 'gn_user' called sys.exit(0)"], 2),
    ("import sys\ndef init(shape):\n    sys.exit(3)\n", ["'gn_user:init' called sys.exit(3)"], 2),
    ("def init(shape):\n    raise ValueError('bad\\nsecond line')\n",
     ["'gn_user:init' raised ValueError: bad\\nsecond line"], 2),
    ("def init(shape):\n    return 'not numbers'\n", ["must be numbers"], 2),
    ("def init(shape):\n    return [[1.0] * shape[0]] * 2\n", ["exactly num_channels=4"], 2),
    ("init = 42\n", ["has no function 'init'"], 2),
    ("def init(shape):\n    raise KeyboardInterrupt\n", None, 130),
])
def test_initializer_code_that_misbehaves(tmp_path: Path, module: str, words, status: int):
    (tmp_path / "gn_user.py").write_text(module)
    (tmp_path / "layer.yaml").write_text(SPEC + "scale_initializer: gn_user:init\n")
    before = tree(tmp_path)
    path = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    proc = cli(tmp_path, "show", "layer.yaml", "--allow-code", PYTHONPATH=path)
    if status == 130:
        assert proc.returncode == 130 and proc.stderr == "error: interrupted\n", proc.stderr
    else:
        refused(proc, "scale_initializer", *words)
    assert proc.stdout == ""
    after = {k: v for k, v in tree(tmp_path).items() if "__pycache__" not in k}
    assert after == before


# --------------------------------------------------------------------------- sizes


def test_too_many_channels_is_refused_before_any_work(tmp_path: Path):
    """2^22 channels took 26 s and 1.35 GB to `show`: past 2^20 it is one line, at once."""
    (tmp_path / "wide.yaml").write_text("num_groups: 1024\nformat: CB\ninput_size: [4194304]\n")
    for command in ("show", "build"):
        proc = cli(tmp_path, command, "wide.yaml", timeout=30)
        refused(proc, "input_size[0]", "4194304 channels", "limit 1048576")
    assert sorted(os.listdir(tmp_path)) == ["wide.yaml"]


def test_a_size_this_machine_cannot_verify_is_refused_before_any_work(tmp_path: Path):
    """2^38 elements an observation: the spec holds it (the sizes are constants in the code),
    verifying it would need 3 TiB: one line at once, nothing written; --no-verify writes code
    that compiles. CUDA indexes within a group in an int and says so past its limit."""
    (tmp_path / "big.yaml").write_text("num_groups: 256\nformat: SSCB\n"
                                       "input_size: [32768, 32768, 256]\n")
    for target in ("c", "cuda", "aarch64-linux"):
        started = time.monotonic()
        proc = cli(tmp_path, "build", "big.yaml", "--target", target, timeout=30)
        refused(proc, "layer 'big'", "274877906944 elements", "GiB", "--no-verify")
        assert time.monotonic() - started < 10
    assert sorted(os.listdir(tmp_path)) == ["big.yaml"]
    proc = cli(tmp_path, "build", "big.yaml", "--target", "all", "--no-verify", timeout=60)
    assert proc.returncode == 0, proc.stderr
    header = (tmp_path / "generated" / "big" / "big.h").read_text()
    assert "#define BIG_OBSERVATION_NUMEL 274877906944" in header
    subprocess.run(["gcc", "-std=c99", "-O2", "-Wall", "-Wextra", "-Wpedantic", "-Wconversion",
                    "-Werror", "-c", "big.c", "-o", os.devnull],
                   cwd=tmp_path / "generated" / "big", check=True, timeout=120)
    (tmp_path / "one.yaml").write_text("num_groups: 1\nformat: SSCB\n"
                                       "input_size: [65536, 65536, 1]\n")
    proc = cli(tmp_path, "build", "one.yaml", "--target", "cuda", "--no-verify", "-o", "one")
    refused(proc, "input_size", "a group of 4294967296 elements", "cuda target", "c target")
    assert not (tmp_path / "one").exists()


@pytest.mark.slow
def test_an_observation_over_2_28_elements_verifies_at_its_real_size(tmp_path: Path):
    """268,451,840 elements in one group (just over 2^28, once the cap): built and verified on
    the host at that size against the float64 reference, in about 3.3 GB."""
    (tmp_path / "big.yaml").write_text("num_groups: 1\nformat: SSCB\n"
                                       "input_size: [16385, 16384, 1]\n")
    proc, peak_kib = peak_of(tmp_path, "build", "big.yaml", "--target", "c", timeout=1200)
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((tmp_path / "generated" / "big" / "manifest.json").read_text())
    (run,) = manifest["verification"]
    assert run["passed"] and len(run["cases"]) == 5      # batch 1: no batch case
    assert max(run["cases"].values()) <= 1e-6
    assert peak_kib < 4.5 * 2**20, f"verification held {peak_kib} KiB"


@pytest.mark.slow
def test_the_largest_channel_count_shows_and_stays_small(tmp_path: Path):
    """2^20 channels: the parameters are spelled once per distinct value and printed by a
    filter, so `show` holds a few hundred megabytes (it held 1.35 GB at 2^22)."""
    (tmp_path / "wide.yaml").write_text("num_groups: 1024\nformat: CB\ninput_size: [1048576]\n")
    proc, peak_kib = peak_of(tmp_path, "show", "wide.yaml")
    assert proc.returncode == 0, proc.stderr
    assert peak_kib < 600 * 1024, f"show held {peak_kib} KiB"


def peak_of(root: Path, *args: str, timeout: float = 600) -> tuple[subprocess.CompletedProcess, int]:
    """Run the CLI in a child of a child and return (its process, the peak KiB a child held)."""
    code = ("import resource, subprocess, sys; "
            "p = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
            "sys.stderr.write(p.stderr); "
            "print(p.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    proc = subprocess.run([sys.executable, "-c", code, *CLI, *args], cwd=root,
                          env=env_for(root), capture_output=True, text=True, timeout=timeout)
    status, peak_kib = map(int, proc.stdout.split())
    return subprocess.CompletedProcess(args, status, "", proc.stderr), peak_kib


@pytest.mark.slow
def test_verifying_a_large_observation_holds_about_its_own_bytes(tmp_path: Path):
    """SSCB 8192x8192x1 took 6.3 GB to verify (~95 bytes an element: every case at once, in
    float64, and the reference's float64 copies). Cases are now made one at a time in the
    storage type and compared a chunk at a time: at 2^24 elements, about 16 bytes each."""
    numel = 4096 * 4096
    (tmp_path / "big.yaml").write_text("num_groups: 1\nformat: SSCB\n"
                                       "input_size: [4096, 4096, 1]\n")
    proc, peak_kib = peak_of(tmp_path, "build", "big.yaml", "--target", "c", "-o", "out")
    assert proc.returncode == 0, proc.stderr
    budget_kib = (20 * numel + (96 << 20)) // 1024
    assert peak_kib < budget_kib, f"verification held {peak_kib} KiB, budget {budget_kib} KiB"
