"""The build step: content cache, explainable failures, --keep."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from gncodegen.targets.c import runner as build_mod
from gncodegen.targets.c.runner import build_c_module
from gncodegen.cli import main
from gncodegen.errors import BuildError
from gncodegen.plan import lower
from gncodegen.render import Source
from gncodegen.targets.c import render_c

from conftest import EXAMPLES, make_layer


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GNCODEGEN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _count_compiles(monkeypatch):
    calls = []
    real = build_mod.run_compiler

    def counting(what, command, cwd=None):
        calls.append(what)
        return real(what, command, cwd)

    monkeypatch.setattr(build_mod, "run_compiler", counting)
    return calls


def test_cache_reuses_a_build_and_keys_on_flags(cache, monkeypatch):
    plan = lower(make_layer(format="CB", input_size=[8], num_groups=2))
    sources = list(render_c(plan, "t.yaml"))
    calls = _count_compiles(monkeypatch)
    first = build_c_module((plan,), sources)
    assert calls and first.path.parent == cache
    n = len(calls)
    again = build_c_module((plan,), sources)
    assert len(calls) == n and again.path == first.path          # cache hit: no compiler run
    other = build_c_module((plan,), sources, flags=(*build_mod.HOST_FLAGS, "-O3"))
    assert len(calls) > n and other.path != first.path           # new flags: a new build
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]   # no half-built folders


def test_compile_failure_carries_command_and_compiler_output(cache):
    plan = lower(make_layer(format="CB", input_size=[8], num_groups=2))
    header, source = render_c(plan, "t.yaml")
    broken = Source(source.name, source.text.replace("return T_OK;", "return T_OK +;"))
    with pytest.raises(BuildError) as info:
        build_c_module((plan,), [header, broken])
    message = str(info.value)
    assert "t.c: compile failed:" in message
    assert "-Werror" in message and " -c t.c" in message          # the command line
    assert "error:" in message and "expected expression" in message  # the compiler's words
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]


def test_keep_prints_the_build_folder(cache, tmp_path):
    result = CliRunner().invoke(main, ["verify", str(EXAMPLES / "features_channelwise.yaml"),
                                       "--keep"])
    assert result.exit_code == 0, result.output
    assert f"build folder: {cache}" in result.output


def test_missing_compiler_is_named(cache):
    plan = lower(make_layer(format="CB", input_size=[8], num_groups=2))
    with pytest.raises(Exception, match="compiler 'no-such-cc' not found"):
        build_c_module((plan,), list(render_c(plan, "t.yaml")), cc="no-such-cc")


def test_work_folders_of_killed_builds_are_swept(tmp_path, monkeypatch):
    """A build removes the hidden work folders a killed run left beside the cache entries
    once they are an hour old, and leaves a running build's (fresh) one alone."""
    import os
    import time

    from gncodegen.build import STALE_WORK_SECONDS, staged_entry

    cache = tmp_path / "cache"
    cache.mkdir()
    stale = cache / ".abc123.k9x2"
    fresh = cache / ".def456.q1w2"
    entry = cache / "keepme"
    for d in (stale, fresh, entry):
        d.mkdir()
        (d / "f.o").write_text("x")
    old = time.time() - STALE_WORK_SECONDS - 60
    os.utime(stale, (old, old))
    os.utime(entry, (old, old))
    with staged_entry(cache / "newentry", "done") as work:
        (work / "done").write_text("ok")
    assert not stale.exists()
    assert fresh.is_dir() and entry.is_dir()            # a live build's, and a real entry
    assert (cache / "newentry" / "done").read_text() == "ok"
    assert sorted(p.name for p in cache.iterdir()) == [".def456.q1w2", "keepme", "newentry"]
