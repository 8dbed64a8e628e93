"""Property tests: random valid specs, generated C against the float64 reference.

Each hypothesis example is one multi-layer spec of LAYERS_PER_MODULE random layers built into ONE
cffi module (one compiler run per layer source plus one wrapper), so EXAMPLES examples check
EXAMPLES * LAYERS_PER_MODULE random specs without as many module builds. Layers draw every
format letter (S up to 3, C, optional B and T, U up to 2) in a random order, both layouts, group
counts from 1 to C (as integers or the words), sizes from 1 upward including primes and sizes
that leave SIMD remainders, epsilon from 1e-12 to 1, single and double, inline or initialized
parameters, and sometimes threads. Modules are built at -O2 (the fast kernel) or -Os (the compact kernel
the template selects for size). Runs are derandomized, so CI is reproducible,
and a failure prints the failing layer as YAML.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from gncodegen.targets.c.runner import HOST_FLAGS, build_c_module
from gncodegen.plan import lower_spec
from gncodegen.dtypes import round_to_dtype
from gncodegen.targets.c import render_c
from gncodegen.pipeline import parse_spec
from gncodegen.verify import Case, make_cases, verification_batch, verify_layer
from gncodegen.targets.c.runner import c_runner

from conftest import small_cuda_geometry

LAYERS_PER_MODULE = 20
EXAMPLES = 25
MIN_SPECS = 500
MAX_OBSERVATION = 6000      # elements per observation: keeps 500 layers' verification fast
CUDA_EXAMPLES = 12          # one harness build each (host emulation: a g++ run of the .cu)
# Sizes: small, primes, powers of two and their neighbours (vector remainders for 4/8/16 lanes).
SIZES = (1, 2, 3, 4, 5, 7, 8, 9, 11, 13, 15, 16, 17, 23, 31, 32, 33, 47, 64, 65, 97, 128, 257)
CHANNELS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 15, 16, 17, 20, 24, 32, 33, 48, 64)
SIZE_FLAGS = tuple("-Os" if f == "-O2" else f for f in HOST_FLAGS)
assert SIZE_FLAGS != HOST_FLAGS


@st.composite
def layer_docs(draw, dtypes=("single", "double")) -> dict:
    """Return one random valid layer as the dict a spec file would hold (no name)."""
    n_s = draw(st.integers(0, 3))
    letters = ["C"] + ["S"] * n_s + ["B"] * draw(st.integers(0, 1)) \
        + ["T"] * draw(st.integers(0, 1)) + ["U"] * draw(st.integers(0, 2))
    fmt = "".join(draw(st.permutations(letters)))
    channels = draw(st.sampled_from(CHANNELS))
    sizes = []
    budget = MAX_OBSERVATION // channels
    for ch in fmt:
        if ch == "B":
            continue
        if ch == "C":
            sizes.append(channels)
            continue
        size = draw(st.sampled_from([s for s in SIZES if s <= budget]))
        budget //= size
        sizes.append(size)
    divisors = [g for g in range(1, channels + 1) if channels % g == 0]
    groups = draw(st.one_of(st.sampled_from(divisors),
                            st.sampled_from(["all-channels", "channel-wise"])))
    doc = {
        "num_groups": groups,
        "format": fmt,
        "layout": draw(st.sampled_from(["column-major", "row-major"])),
        "input_size": sizes,
        "epsilon": float(f"{10 ** draw(st.floats(-12, 0)):.6g}"),
        "dtype": draw(st.sampled_from(list(dtypes))),
    }
    if draw(st.booleans()):
        doc["num_channels"] = channels
    param = draw(st.sampled_from(["default", "narrow-normal", "inline"]))
    if param == "narrow-normal":
        doc["scale_initializer"] = "narrow-normal"
        doc["offset_initializer"] = {"name": "narrow-normal", "seed": draw(st.integers(0, 99))}
    elif param == "inline":
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        doc["scale"] = [float(v) for v in rng.normal(1.0, 0.5, channels)]
        doc["offset"] = [float(v) for v in rng.normal(0.0, 0.5, channels)]
    threads = draw(st.sampled_from([1, 1, 1, 1, 2, 3]))
    if threads > 1:
        doc["threads"] = threads
    return doc


def extra_case(layer, seed: int) -> Case:
    """Return a case make_cases lacks: an odd batch, in place, with the caller's parameters."""
    rng = np.random.default_rng(seed)
    batch = verification_batch(layer, 3)
    dt = layer.dtype
    return Case(f"random, batch {batch}, in place, caller's parameters",
                round_to_dtype(rng.normal(-2.0, 3.0, batch * layer.observation_numel), dt),
                batch, in_place=True,
                scale=round_to_dtype(rng.normal(0.0, 2.0, layer.num_channels), dt),
                offset=round_to_dtype(rng.normal(0.0, 2.0, layer.num_channels), dt))


def check_module(docs: list[dict], flags: tuple[str, ...], tmp: Path) -> int:
    """Build the layers as one module with flags, verify each; return how many were checked."""
    named = [{"name": f"p{i}", **doc} for i, doc in enumerate(docs)]
    spec = parse_spec(yaml.safe_dump({"layers": named}, sort_keys=False), base_dir=tmp,
                      stem="properties")
    plans = lower_spec(spec)
    sources = [s for p in plans for s in render_c(p, "properties.yaml")]
    module = build_c_module(plans, sources, flags=flags)
    for i, (doc, plan) in enumerate(zip(named, plans)):
        layer = plan.layer
        cases = make_cases(layer, seed=i) + [extra_case(layer, seed=1000 + i)]
        report = verify_layer(layer, "c", "host", c_runner(plan, module), cases)
        if not report.passed:
            bad = [f"  {c.case}: max rel error {c.max_rel:.3g} (tolerance {report.tolerance:g}), "
                   f"{c.nan_mismatch} NaN mismatches" for c in report.cases if not c.passed]
            pytest.fail("generated C disagrees with the reference (flags "
                        f"{' '.join(flags)}) for this spec:\n"
                        + yaml.safe_dump(doc, sort_keys=False, default_flow_style=None)
                        + "\n".join(bad), pytrace=False)
    return len(plans)


def test_random_specs_match_reference(tmp_path: Path):
    """At least 500 random valid specs: the generated C matches the reference on every case."""
    checked: list[int] = []
    started = time.monotonic()

    @settings(max_examples=EXAMPLES, derandomize=True, database=None,
              deadline=timedelta(seconds=90), print_blob=False,
              # No shrinking: each step is a module build, and the failure names its layer.
              phases=[Phase.explicit, Phase.generate],
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.function_scoped_fixture])
    @given(st.lists(layer_docs(), min_size=LAYERS_PER_MODULE, max_size=LAYERS_PER_MODULE),
           st.sampled_from([HOST_FLAGS, SIZE_FLAGS]))
    def check(docs: list[dict], flags: tuple[str, ...]) -> None:
        # About half the modules build for size (the compact kernel), the rest at -O2.
        checked.append(check_module(docs, flags, tmp_path))

    check()
    elapsed = time.monotonic() - started
    print(f"{sum(checked)} random specs in {len(checked)} modules, {elapsed:.0f} s")
    assert sum(checked) >= MIN_SPECS


def test_strategy_covers_the_space():
    """The strategy reaches every kind of layer listed here (so the property test cannot
    silently narrow)."""
    seen: list[dict] = []

    @settings(max_examples=300, derandomize=True, database=None, phases=[Phase.generate])
    @given(layer_docs())
    def collect(doc: dict) -> None:
        seen.append(doc)

    collect()

    def has(pred) -> bool:
        return any(pred(d) for d in seen)

    def channels(d) -> int:
        return d["input_size"][d["format"].replace("B", "").index("C")]

    assert has(lambda d: "B" not in d["format"])
    assert has(lambda d: "U" in d["format"] and "T" in d["format"])
    assert has(lambda d: d["format"].count("S") == 3 and d["layout"] == "row-major")
    assert has(lambda d: d["format"].index("C") > d["format"].find("S") >= 0)
    assert has(lambda d: d["format"].index("B") < d["format"].index("C") if "B" in d["format"]
               else False)
    assert has(lambda d: d["num_groups"] == "channel-wise")
    assert has(lambda d: d["num_groups"] == "all-channels")
    assert has(lambda d: d["num_groups"] == 1 and channels(d) > 1)
    assert has(lambda d: isinstance(d["num_groups"], int) and d["num_groups"] > 1
               and d["num_groups"] == channels(d))
    assert has(lambda d: any(s in (17, 31, 97) for s in d["input_size"]))
    assert has(lambda d: 257 in d["input_size"] or 65 in d["input_size"])
    assert has(lambda d: d["epsilon"] < 1e-11)
    assert has(lambda d: d["epsilon"] > 0.5)
    assert has(lambda d: d["dtype"] == "double" and d.get("threads", 1) > 1)
    assert has(lambda d: "scale" in d)
    assert has(lambda d: math.prod(d["input_size"]) > 2000)


@pytest.mark.parametrize("geometry", ["real", "small"])
def test_random_specs_match_reference_cuda(geometry):
    """Random specs through the generated CUDA (host emulation here, the GPU where there is
    one), every dtype including half and bfloat16: the same verification cases pass. With the
    real geometry small random shapes mostly take the warp and block kernels; the small one
    sends them through clusters, looped, rows and split kernels too."""
    from gncodegen.targets.cuda.lower import lower_cuda
    from gncodegen.targets.cuda.render import render_cuda
    from gncodegen.targets.cuda.runner import build_harness, cuda_runner, gpu_name

    mode = "gpu" if gpu_name() else "emulation"
    checked: list[int] = []
    strategies: set[str] = set()

    @settings(max_examples=CUDA_EXAMPLES, derandomize=True, database=None, deadline=None,
              print_blob=False, phases=[Phase.explicit, Phase.generate],
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(layer_docs(dtypes=("single", "double", "half", "bfloat16")))
    def check(doc: dict) -> None:
        doc = {"name": "pc", **doc}
        doc.pop("threads", None)
        spec = parse_spec(yaml.safe_dump(doc, sort_keys=False), base_dir=Path("."),
                          stem="properties")
        plan = lower_spec(spec)[0]
        cp = lower_cuda(plan, small_cuda_geometry() if geometry == "small" else None)
        strategies.update(v.strategy for v in cp.variants)
        sources = list(render_cuda(plan, "properties.yaml", cuda_plan=cp))
        exe = build_harness(plan, cp, sources, mode)
        report = verify_layer(plan.layer, "cuda", mode, cuda_runner(plan, exe),
                              make_cases(plan.layer, seed=len(checked)))
        if not report.passed:
            bad = [f"  {c.case}: max rel error {c.max_rel:.3g} (tolerance {report.tolerance:g}), "
                   f"{c.nan_mismatch} NaN mismatches" for c in report.cases if not c.passed]
            pytest.fail(f"generated CUDA ({mode}) disagrees with the reference for this spec:\n"
                        + yaml.safe_dump(doc, sort_keys=False, default_flow_style=None)
                        + "\n".join(bad), pytrace=False)
        checked.append(1)

    check()
    assert len(checked) == CUDA_EXAMPLES
    if geometry == "small":
        assert {"warp", "cluster", "looped", "split"} <= strategies, strategies


# --------------------------------------------------------------------------- hostile input
#
# The contract of the command line for any input: status 0, or status 2 with one line
# `error: <field>: <rule>` on stderr and no traceback; and never a changed byte outside the
# output folder. Examples run in-process through click's runner (no compiler: --no-verify),
# each in a fresh folder, so a few hundred take seconds.

HOSTILE = settings(max_examples=120, derandomize=True, database=None,
                   deadline=timedelta(seconds=5), print_blob=False,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                          HealthCheck.function_scoped_fixture])
GOOD_SPEC = {"name": "layer", "num_groups": "2", "format": "CB", "input_size": "[4]"}
ODD_CHARS = list("ab_.-*?/ ") + ["\u202e", "\u2066", "\u2069", "\u200e", "\u200f", "\u061c",
                                 "\u200b", "\ufeff", "\u2028", "\u00a0", "\x01", "\x1b", "\x7f",
                                 "\u00e9", "\ue000", "\n", "\t", "\\", "'", '"']
# Number and word forms YAML 1.1 and 1.2 read differently, and tags.
SCALAR_FORMS = ["010", "0o10", "0x10", "1:0", "1:00:00", "1_000", "1_0e-5", "1e-5", "1E3",
                ".5", "+1", "-0", "00", "0b101", "yes", "No", "on", "OFF", "y", "~", "null",
                "True", ".inf", "-.Inf", ".NaN", "2001-12-14", "'4'", '"4"', "!!int 4",
                "!!float 4", "!!str 4", "!!int 4.5", "!!bool yes", "!!binary aGk=",
                "!!timestamp 2001-12-14", "!!python/none ''", "!local 1", "4", "2", "1.0",
                "3.4e38", "1e-50", "9" * 40, "=", "<<", "*undefined", "&a 2"]


def _laughs(levels: int) -> str:
    text = "&b0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"
    for k in range(1, levels):
        text = f"&b{k} [{text}" + f", *b{k - 1}" * 9 + "]"
    return text


def _quoted(text: str) -> str:
    return json.dumps(text)          # a YAML double-quoted scalar, escapes included


odd_text = st.text(st.sampled_from(ODD_CHARS), max_size=8)
yaml_values = st.recursive(
    st.one_of(st.sampled_from(SCALAR_FORMS), odd_text.map(_quoted),
              st.integers(1, 9).map(_laughs),
              st.sampled_from([1, 2, 31, 32, 33, 40, 3000]).map(lambda d: "[" * d + "1" + "]" * d),
              st.sampled_from(["&r [*r]", "&r [1, [2, *r]]", "&r {x: *r}", "&m {<<: *m}",
                               "{file: p.npz, key: k}", "{file: s.npy}", "{file: w.mat, var: v}",
                               "[1, 1, 1, 1]", "[[1], [1], [1], [1]]"])),
    lambda inner: st.one_of(st.lists(inner, max_size=4).map(lambda v: "[" + ", ".join(v) + "]"),
                            st.lists(st.tuples(st.sampled_from(["a", "file", "key", "1", "<<"]),
                                               inner), max_size=3)
                            .map(lambda kv: "{" + ", ".join(f"{k}: {v}" for k, v in kv) + "}")),
    max_leaves=6)
KEYS = ["name", "num_groups", "format", "layout", "input_size", "epsilon", "dtype", "scale",
        "offset", "scale_initializer", "seed", "threads", "cuda_arch", "NumGroups", "Epsilon"]
odd_lines = st.sampled_from([
    "? [a, b]\n: 1\n", "? {a: 1}\n: 1\n", "1.5: x\n", "null: x\n", "true: x\n",
    "num_groups: 2\n", "<<: {num_groups: 2}\n", "<<: [{dtype: double}, {layout: row-major}]\n",
    "<<: 5\n", "&k name: layer\n", f"{_quoted(chr(0x202e) + 'x')}: 1\n", "---\nname: b\n",
    "%YAML 1.1\n", "x: !!set {a}\n", "'<<': 1\n",
])


@st.composite
def hostile_specs(draw) -> tuple[str, str]:
    """Return (spec file name, YAML text): the good spec with some values and lines replaced
    by hostile ones."""
    doc = dict(GOOD_SPEC)
    for key in draw(st.lists(st.sampled_from(KEYS), max_size=3, unique=True)):
        doc[key] = draw(yaml_values)
    lines = [f"{k}: {v}\n" for k, v in doc.items()]
    for _ in range(draw(st.integers(0, 2))):
        lines.insert(draw(st.integers(0, len(lines))), draw(odd_lines))
    text = "".join(lines)
    if draw(st.booleans()):
        text = "layers:\n" + "".join(("  - " if i == 0 else "    ") + line
                                     for i, line in enumerate(text.splitlines(True))
                                     if not line.startswith(("%", "---")))
    stem = draw(st.one_of(st.just("layer"), st.text(st.sampled_from(
        [c for c in ODD_CHARS if c not in "/\n"] + list("layer")), min_size=1, max_size=6)))
    return stem + ".yaml", text


def _tree(root: Path) -> dict[str, tuple]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st_ = p.lstat()
            kind = ("link", os.readlink(p)) if p.is_symlink() else \
                ("dir",) if p.is_dir() else ("file", p.read_bytes(), st_.st_mtime_ns)
            out[os.fsdecode(p.relative_to(root))] = kind
    return out


def _check_contract(result, root: Path, before: dict, out: Path | None) -> None:
    """Exit 0 or 2 with one error line, no traceback; nothing outside out changed."""
    text = result.stdout + result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        f"{type(result.exception).__name__}: {result.exception}"
    assert "Traceback" not in text, text
    assert result.exit_code in (0, 2), text
    if result.exit_code == 2:
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and re.match(r"error: [^:\n]+: \S", lines[0]), result.stderr
        assert len(lines[0]) < 400
    after = _tree(root)
    if result.exit_code == 0 and out is not None:
        inside = os.fsdecode(out.relative_to(root)) if out.is_relative_to(root) else None
        def outside(items: dict) -> dict:
            return {k: v for k, v in items.items()
                    if inside is None or not (k == inside or k.startswith(inside + "/"))}
        new = set(outside(after)) - set(outside(before))
        assert all(after[k] == ("dir",) and (inside or "").startswith(k + "/") for k in new), \
            sorted(new)                                     # only the output's new parents
        assert {k: v for k, v in outside(after).items() if k in before} == outside(before)
    else:
        assert after == before, "a refused run changed files"


def _runner_in(root: Path):
    from click.testing import CliRunner

    return CliRunner(env={"GNCODEGEN_CACHE": str(root.parent / "cache")})


def test_hostile_yaml_keeps_the_contract():
    """Aliases, nesting, odd keys, YAML 1.1 number forms, control and bidirectional
    characters in values and file names: exit 0 or 2, one line, nothing changed."""
    from gncodegen.cli import main

    @HOSTILE
    @given(hostile_specs())
    def check(case: tuple[str, str]) -> None:
        name, text = case
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp) / "work"
            root.mkdir()
            (root / name).write_text(text, errors="surrogateescape")
            np.save(root / "s.npy", np.ones(4))
            np.savez(root / "p.npz", k=np.ones(4))
            before = _tree(root)
            cwd = os.getcwd()
            os.chdir(root)
            try:
                result = _runner_in(root).invoke(main, ["build", name, "--no-verify",
                                                        "-o", "out"])
            finally:
                os.chdir(cwd)
            _check_contract(result, root, before, root / "out")

    check()


OUTPUT_PARTS = ["out", "new", "..", ".", "victim", "notes.txt", "link_victim", "dangling",
                "link_notes", "prev", "x" * 256, "y" * 200, "\u202eodd", "sub dir"]


def output_paths() -> st.SearchStrategy[str]:
    """Relative -o values (or nothing); at most two `..`, so none leaves the test's folder."""
    paths = st.lists(st.sampled_from(OUTPUT_PARTS), min_size=1, max_size=4).map("/".join)
    return st.one_of(st.just(""), paths.filter(lambda p: p.split("/").count("..") <= 2))


def test_hostile_output_paths_keep_the_contract():
    """`-o` as `..`, `.`, symbolic links (to a user's folder, to a file, to nothing), existing
    files, long names: exit 0 or 2, one line, and no byte outside the output folder changes
    (a user's folder is never replaced)."""
    from gncodegen.cli import main

    @HOSTILE
    @given(output_paths())
    def check(out: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp) / "root"
            work = root / "work"
            (root / "victim").mkdir(parents=True)
            (root / "victim" / "thesis.tex").write_text("years of work")
            work.mkdir()
            (work / "layer.yaml").write_text("".join(f"{k}: {v}\n" for k, v in GOOD_SPEC.items()))
            (work / "notes.txt").write_text("keep")
            (work / "link_victim").symlink_to(root / "victim")
            (work / "link_notes").symlink_to(work / "notes.txt")
            (work / "dangling").symlink_to(work / "never")
            cwd = os.getcwd()
            os.chdir(work)
            try:
                runner = _runner_in(root)
                assert runner.invoke(main, ["build", "layer.yaml", "--no-verify", "-o",
                                            "prev"]).exit_code == 0
                before = _tree(root)
                result = runner.invoke(main, ["build", "layer.yaml", "--no-verify", "-o", out])
            finally:
                os.chdir(cwd)
            assert not out.startswith("/")
            final = Path(os.path.realpath(work / out))
            assert final.is_relative_to(Path(tmp).resolve())
            _check_contract(result, root, before, final)
            assert (root / "victim" / "thesis.tex").read_text() == "years of work"

    check()
