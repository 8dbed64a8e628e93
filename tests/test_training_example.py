"""The training example: examples/training/fit_sgdm.c fits the scale and offset of
examples/train_sgdm.yaml to a target by SGDM through the generated C, on the host and on a
Cortex-M4 under QEMU, and the loss it prints falls.

Nothing here is skipped: a missing toolchain fails with the package to install."""

from __future__ import annotations

import re
import subprocess

import pytest

from gncodegen.build import STRICT_WARNINGS
from gncodegen.pipeline import load_spec
from gncodegen.plan import lower
from gncodegen.render import Source
from gncodegen.targets.c import render_c
from gncodegen.targets.firmware.boards import BOARDS
from gncodegen.targets.firmware.qemu import build_image, run_image

from conftest import EXAMPLES, REPO

PROGRAM = EXAMPLES / "training" / "fit_sgdm.c"
RUNTIME = REPO / "gncodegen" / "targets" / "firmware" / "runtime"
LOSS = re.compile(r"step (\d+) loss (\d)\.(\d{4})e([+-]\d+)\Z")


def layer_sources():
    plan = lower(load_spec(EXAMPLES / "train_sgdm.yaml").layers[0])
    return plan, list(render_c(plan, "train_sgdm.yaml"))


def losses(printout: str) -> list[tuple[int, float]]:
    """Return (step, loss) from the program's lines, and check it ended as it says."""
    out = []
    for line in printout.splitlines():
        m = LOSS.match(line)
        if m:
            out.append((int(m.group(1)), float(f"{m.group(2)}.{m.group(3)}e{m.group(4)}")))
    assert out, printout
    assert "fit ok" in printout.splitlines(), printout
    return out


def check_falls(points: list[tuple[int, float]]) -> None:
    steps = [s for s, _ in points]
    assert steps == list(range(0, 101, 10)), steps
    first, last = points[0][1], points[-1][1]
    assert first > 0.05 and last < first * 1e-3, points
    # falling overall: every loss below the first, and the second half below the first half's
    assert all(v < first for _, v in points[1:]), points
    assert max(v for _, v in points[6:]) < min(v for _, v in points[:3]), points


def test_fit_on_the_host(tmp_path):
    _, sources = layer_sources()
    for s in sources:
        (tmp_path / s.name).write_text(s.text)
    exe = tmp_path / "fit"
    subprocess.run(["cc", "-std=c99", "-O2", *STRICT_WARNINGS, f"-I{tmp_path}", f"-I{RUNTIME}",
                    str(PROGRAM), str(tmp_path / "train_sgdm.c"), str(RUNTIME / "hosted_io.c"),
                    "-lm", "-o", str(exe)], check=True, capture_output=True, text=True)
    proc = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    check_falls(losses(proc.stdout))


@pytest.mark.parametrize("board", ["cortex-m4"])
def test_fit_on_a_cortex_m(board):
    """The same program, built for the core with the harness's flags (-Os and the strict
    warnings), runs under QEMU with semihosting."""
    plan, sources = layer_sources()
    image = build_image(BOARDS[board], plan, sources, Source("fit_sgdm.c", PROGRAM.read_text()))
    check_falls(losses(run_image(image)))


def test_a_target_that_does_not_fit_is_reported():
    """The loss check can fail: a program that stops after one step does not fit."""
    points = [(0, 0.2), (10, 0.1)]
    with pytest.raises(AssertionError):
        check_falls(points)
