"""generated/ is exactly what the CLI writes for examples/: regenerating changes no byte.

CUDA is verified under the host emulation as scripts/regenerate.sh does, so that a machine with
a GPU (whose figures differ) writes the same manifest.
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from gncodegen.cli import main

from conftest import EXAMPLES, REPO

GENERATED = REPO / "generated"
EXAMPLE_SPECS = sorted(EXAMPLES.glob("*.yaml"))


def test_every_example_has_generated_output():
    assert EXAMPLE_SPECS
    assert sorted(p.stem for p in EXAMPLE_SPECS) == \
        sorted(p.name for p in GENERATED.iterdir() if p.is_dir())


@pytest.mark.parametrize("spec", EXAMPLE_SPECS, ids=lambda p: p.stem)
def test_regenerating_changes_no_byte(spec, tmp_path):
    committed = GENERATED / spec.stem
    targets = json.loads((committed / "manifest.json").read_text())["targets"]
    target = "all" if sorted(targets) == ["c", "cuda"] else targets[0]
    assert len(targets) == 1 or target == "all", targets
    out = tmp_path / spec.stem
    result = CliRunner().invoke(main, ["build", str(spec), "-o", str(out), "--target", target,
                                        "--cuda-runner", "emulation"])
    assert result.exit_code == 0, result.output
    fresh = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
    old = {p.name: p.read_bytes() for p in sorted(committed.iterdir())}
    assert sorted(fresh) == sorted(old)
    for name in fresh:
        assert fresh[name] == old[name], f"generated/{spec.stem}/{name} is stale: run scripts/regenerate.sh"
