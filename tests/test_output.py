"""The output folder: only a folder of ours is ever replaced, decided on what the path resolves
to and again on what the swap displaced; every refusal leaves every byte where it was."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gncodegen import output
from gncodegen.errors import SpecError

SPEC = "num_groups: 2\nformat: CB\ninput_size: [4]\n"
CLI = [sys.executable, "-P", "-m", "gncodegen.cli"]


def tree(root: Path) -> dict[str, bytes | str]:
    """Return every path under root (links as their targets, folders as '/') with its bytes."""
    out: dict[str, bytes | str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "-> " + os.readlink(p)
            elif p.is_dir():
                out[rel] = "/"
            else:
                out[rel] = p.read_bytes()
    return out


def ours(folder: Path, files: dict[str, str]) -> None:
    """Make folder a gncodegen output holding files."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)
    manifest = {"generator": "gncodegen 0.1.0",
                "files": {n: hashlib.sha256(t.encode()).hexdigest() for n, t in files.items()}}
    (folder / output.MANIFEST).write_text(json.dumps(manifest))


def build(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    (cwd / "layer.yaml").write_text(SPEC)
    env = {**os.environ, "GNCODEGEN_CACHE": str(cwd / ".cache")}
    return subprocess.run([*CLI, "build", "layer.yaml", "--no-verify", *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=120)


def refused(proc: subprocess.CompletedProcess, *words: str) -> None:
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2, text
    assert "Traceback" not in text, text
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: output: "), err
    for word in words:
        assert word in err[0], err[0]


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """A folder of the user's own files."""
    folder = tmp_path / "victim"
    folder.mkdir()
    (folder / "thesis.tex").write_text("years of work")
    (folder / "data").mkdir()
    (folder / "data" / "run1.csv").write_text("1,2,3")
    return folder


def test_dotdot_through_a_new_folder_is_resolved_first(tmp_path: Path, victim: Path):
    """`-o newdir/../victim`: the ownership check runs on victim, so nothing is deleted."""
    before = tree(tmp_path)
    proc = build(tmp_path, "-o", "newdir/../victim")
    refused(proc, "did not write")
    after = tree(tmp_path)
    after.pop("layer.yaml"), before.pop("layer.yaml", None)
    assert {k: v for k, v in after.items() if not k.startswith(".cache")} == before
    assert not (tmp_path / "newdir").exists()


def test_dotdot_through_a_new_folder_into_a_new_one(tmp_path: Path):
    """The same path shape where the target is new: written there, and `newdir` made."""
    proc = build(tmp_path, "-o", "newdir/../fresh")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "fresh" / "layer.c").is_file()


def test_folder_named_like_our_file_is_not_ours(tmp_path: Path):
    """A folder `layer.c/` holding a user's file makes the output folder the user's."""
    out = tmp_path / "out"
    assert build(tmp_path, "-o", "out").returncode == 0
    (out / "layer.c").unlink()
    (out / "layer.c").mkdir()
    (out / "layer.c" / "mine.txt").write_text("keep")
    before = tree(out)
    refused(build(tmp_path, "-o", "out"), "did not write")
    assert tree(out) == before


@pytest.mark.parametrize("change", ["edited", "symlink", "added", "manifest-link"])
def test_changed_files_make_the_folder_the_users(tmp_path: Path, change: str):
    out = tmp_path / "out"
    assert build(tmp_path, "-o", "out").returncode == 0
    if change == "edited":
        with open(out / "layer.c", "a") as fh:
            fh.write("/* my fix */\n")
    elif change == "symlink":
        (tmp_path / "elsewhere.c").write_text((out / "layer.c").read_text())
        (out / "layer.c").unlink()
        (out / "layer.c").symlink_to(tmp_path / "elsewhere.c")
    elif change == "added":
        (out / "notes.txt").write_text("mine")
    else:
        (tmp_path / "m.json").write_bytes((out / "manifest.json").read_bytes())
        (out / "manifest.json").unlink()
        (out / "manifest.json").symlink_to(tmp_path / "m.json")
    before = tree(tmp_path)
    refused(build(tmp_path, "-o", "out"))
    assert {k: v for k, v in tree(tmp_path).items() if not k.startswith(".cache")} == \
        {k: v for k, v in before.items() if not k.startswith(".cache")}


def test_symlink_to_our_folder_is_followed_and_kept(tmp_path: Path):
    """`-o link`: the folder it points to is replaced; the link stays the user's link."""
    real = tmp_path / "real"
    assert build(tmp_path, "-o", "real").returncode == 0
    (tmp_path / "link").symlink_to("real")
    (tmp_path / "layer.yaml").write_text(SPEC.replace("num_groups: 2", "num_groups: 4"))
    env = {**os.environ, "GNCODEGEN_CACHE": str(tmp_path / ".cache")}
    proc = subprocess.run([*CLI, "build", "layer.yaml", "--no-verify", "-o", "link"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "link").is_symlink() and os.readlink(tmp_path / "link") == "real"
    assert "NUM_GROUPS 4" in (real / "layer.h").read_text()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".real")) == []


def test_symlink_to_a_users_folder_is_refused(tmp_path: Path, victim: Path):
    (tmp_path / "link").symlink_to(victim)
    before = tree(victim)
    refused(build(tmp_path, "-o", "link"), "did not write")
    assert tree(victim) == before and (tmp_path / "link").is_symlink()


def test_dangling_symlink_is_refused(tmp_path: Path):
    (tmp_path / "link").symlink_to("nowhere")
    refused(build(tmp_path, "-o", "link"), "symbolic link", "does not exist")
    assert os.readlink(tmp_path / "link") == "nowhere" and not (tmp_path / "nowhere").exists()


# ----------------------------------------------------------------- the check at the swap


def _staged(tmp_path: Path) -> dict[str, str]:
    return {"layer.h": "/* new */\n", "layer.c": "/* new */\n"}


def test_folder_turning_foreign_before_the_swap_is_swapped_back(tmp_path: Path, victim: Path,
                                                                monkeypatch):
    """The early check passed (a race): the swap displaces a user's folder, checks it, and
    exchanges it back untouched."""
    monkeypatch.setattr(output, "check_output", lambda path: output.resolve_output(path))
    before = tree(tmp_path)
    with pytest.raises(SpecError, match="changed while gncodegen was writing"):
        output.write_output(victim, _staged(tmp_path), "{}")
    assert tree(tmp_path) == before


def test_same_race_without_atomic_exchange(tmp_path: Path, victim: Path, monkeypatch):
    monkeypatch.setattr(output, "check_output", lambda path: output.resolve_output(path))
    monkeypatch.setattr(output, "_exchange", lambda a, b: False)
    before = tree(tmp_path)
    with pytest.raises(SpecError, match="changed while gncodegen was writing"):
        output.write_output(victim, _staged(tmp_path), "{}")
    assert tree(tmp_path) == before


def test_new_folder_appearing_before_the_rename_is_not_overwritten(tmp_path: Path, victim: Path,
                                                                   monkeypatch):
    """The folder did not exist when checked, then a user's folder appeared there: the
    no-replace rename fails, the exchange path checks it and puts it back."""
    target = tmp_path / "late"
    real_rename_new = output._rename_new

    def rename_new(stage, final):
        os.rename(victim, final)          # appears just before our rename
        return real_rename_new(stage, final)

    monkeypatch.setattr(output, "_rename_new", rename_new)
    with pytest.raises(SpecError, match="changed while gncodegen was writing"):
        output.write_output(target, _staged(tmp_path), "{}")
    assert (target / "thesis.tex").read_text() == "years of work"
    assert (target / "data" / "run1.csv").read_text() == "1,2,3"


def test_concurrent_first_writes_both_succeed(tmp_path: Path, monkeypatch):
    """Two runs creating the same folder: the second replaces the first's output, no error."""
    target = tmp_path / "out"
    first = {"layer.h": "one\n"}
    real_rename_new = output._rename_new

    def rename_new(stage, final):
        monkeypatch.setattr(output, "_rename_new", real_rename_new)
        output.write_output(final, first, _manifest(first))   # the other run wins the race
        return real_rename_new(stage, final)

    monkeypatch.setattr(output, "_rename_new", rename_new)
    second = {"layer.h": "two\n"}
    output.write_output(target, second, _manifest(second))
    assert (target / "layer.h").read_text() == "two\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def _manifest(files: dict[str, str]) -> str:
    return json.dumps({"generator": "gncodegen test",
                       "files": {n: hashlib.sha256(t.encode()).hexdigest()
                                 for n, t in files.items()}})


def test_file_appearing_in_the_displaced_folder_is_kept(tmp_path: Path):
    """Only the files checked as ours are removed; a newcomer stops the removal."""
    folder = tmp_path / "old"
    ours(folder, {"a.c": "x"})
    names = output.owned_files(folder)
    assert names == ["a.c", "manifest.json"]
    (folder / "late.txt").write_text("mine")
    assert output._remove_owned(folder, names) is False
    assert sorted(p.name for p in folder.iterdir()) == ["late.txt"]


def test_owned_files_rules(tmp_path: Path):
    folder = tmp_path / "f"
    ours(folder, {"a.c": "x", "a.h": "y"})
    assert output.owned_files(folder) == ["a.c", "a.h", "manifest.json"]
    assert output.owned_files(tmp_path / "missing") is None
    (tmp_path / "file").write_text("")
    assert output.owned_files(tmp_path / "file") is None
    (tmp_path / "empty").mkdir()
    assert output.owned_files(tmp_path / "empty") == []
    (folder / "a.c").write_text("changed")
    assert output.owned_files(folder) is None
