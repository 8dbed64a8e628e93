"""Property tests (issue 6 item 1): random valid specs, generated C against the float64 reference.

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

import math
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
from gncodegen.spec import parse_spec
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
    """The strategy reaches what issue 6 lists (so the property test cannot silently narrow)."""
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
