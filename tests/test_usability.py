"""What a user meets around a build: progress lines on a terminal (and none in a pipe), the
cache's `info` and `clean` and its size cap, counts in words that agree with their number."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
import time

from click.testing import CliRunner

from gncodegen.build import parse_bytes, prune_cache
from gncodegen.cli import main

from conftest import EXAMPLES

SPEC = str(EXAMPLES / "matlab_gn.yaml")


def _on_a_terminal(args: list[str], env: dict) -> str:
    """Run the CLI with stderr on a pseudo-terminal; return what the terminal showed."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "gncodegen.cli", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=follower)
    os.close(follower)
    shown = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:
            break
        if not chunk:
            break
        shown += chunk
    proc.wait(timeout=300)
    os.close(leader)
    assert proc.returncode == 0, shown
    return shown.decode()


def test_progress_lines_on_a_terminal_only(tmp_path):
    env = {**os.environ, "GNCODEGEN_CACHE": str(tmp_path / "cache")}
    shown = _on_a_terminal(["build", SPEC, "-t", "c,cortex-m4", "-o", str(tmp_path / "a")], env)
    assert "c: building and verifying 1 layer..." in shown
    assert "cortex-m4: matlab_gn at -Os under qemu" in shown
    piped = subprocess.run([sys.executable, "-m", "gncodegen.cli", "build", SPEC, "-o",
                            str(tmp_path / "b")], env=env, capture_output=True, text=True,
                           check=True)
    assert "..." not in piped.stderr + piped.stdout


def test_cache_info_and_clean(tmp_path, monkeypatch):
    monkeypatch.setenv("GNCODEGEN_CACHE", str(tmp_path / "cache"))
    runner = CliRunner()
    assert runner.invoke(main, ["build", SPEC, "-o", str(tmp_path / "o")]).exit_code == 0
    info = runner.invoke(main, ["cache", "info"])
    assert info.exit_code == 0 and str(tmp_path / "cache") in info.output
    assert "1 build," in info.output and "MiB" in info.output
    clean = runner.invoke(main, ["cache", "clean"])
    assert clean.exit_code == 0 and clean.output.startswith("removed 1 build, ")
    assert "0 builds, 0.0 MiB" in runner.invoke(main, ["cache", "info"]).output
    monkeypatch.setenv("GNCODEGEN_CACHE_MAX", "lots")
    bad = runner.invoke(main, ["cache", "info"])
    assert bad.exit_code != 0 and "GNCODEGEN_CACHE_MAX: 'lots' is not a size" in bad.output


def test_the_cap_removes_the_oldest_builds_first(tmp_path):
    root = tmp_path / "cache"
    old = time.time() - 7200
    for k, size in enumerate((3000, 2000, 1000)):
        entry = root / f"entry{k}"
        entry.mkdir(parents=True)
        (entry / "blob").write_bytes(b"x" * size)
        os.utime(entry, (old + k, old + k))
    assert prune_cache(3500, root) == (1, 3000)          # entry0, the oldest, goes
    assert sorted(p.name for p in root.iterdir()) == ["entry1", "entry2"]
    assert prune_cache(0, root) == (2, 3000)
    # the firmware images are entries one level down; a build in progress is never touched
    nested = root / "firmware"
    for name, size in (("img1", 500), (".img2.abc123", 700)):
        (nested / name).mkdir(parents=True)
        (nested / name / "image.elf").write_bytes(b"x" * size)
        os.utime(nested / name, (old, old))
    (root / "footprint").mkdir()
    (root / "footprint" / "m.json").write_text("{}")
    os.utime(root / "footprint" / "m.json", (old, old))
    assert prune_cache(0, root) == (2, 502)
    assert (nested / ".img2.abc123").is_dir() and not (nested / "img1").exists()
    assert parse_bytes("2G") == 2 << 30 and parse_bytes("500M") == 500 << 20
    assert parse_bytes("1234") == 1234


def test_show_counts_in_words_that_agree():
    result = CliRunner().invoke(main, ["show", str(EXAMPLES / "features_channelwise.yaml")])
    assert result.exit_code == 0
    assert "1 element per group" in result.output and "1 elements" not in result.output
    one = CliRunner().invoke(main, ["show", str(EXAMPLES / "matlab_gn.yaml")])
    assert "20 channels in 4 groups of 5" in one.output
    assert "fused" in one.output and "nothing" in one.output


def test_every_spec_key_and_alias_is_in_the_readme():
    from gncodegen.spec import KEYS
    from gncodegen.targets import spec_options

    from conftest import REPO

    readme = (REPO / "README.md").read_text()
    names = [(k, a) for k, a in KEYS.items()] + [(o.key, o.aliases) for o in spec_options()]
    for key, aliases in names:
        assert f"`{key}`" in readme, key
        for alias in aliases:
            assert f"`{alias}`" in readme, alias
