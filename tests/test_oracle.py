"""The reference and the generated C against PyTorch, the outside oracle, on every format.

Every kind of format (image, sequence, feature, batch-less, U dims, odd label
orders) in both layouts, single and double, batch 1 and batch > 1, in place.
"""

from __future__ import annotations

import numpy as np
import pytest

from gncodegen.dtypes import DTYPES, round_to_dtype
from gncodegen.reference import group_norm_reference
from gncodegen.verify import Case, compare
from gncodegen.targets.c.runner import c_runner

from conftest import build_layers, make_layer, torch_group_norm

# (format, input_size, num_groups): sizes of the non-B labels in format order.
FORMATS = [
    ("CB", [12], 4),
    ("SCB", [7, 12], 3),
    ("SSCB", [5, 4, 12], 4),
    ("SSSCB", [3, 4, 2, 6], 2),
    ("CBT", [12, 5], 3),
    ("SCBT", [4, 6, 3], 2),
    ("SSCBT", [3, 3, 6, 4], 3),
    ("SSSCBT", [2, 3, 2, 4, 3], 2),
    ("SC", [9, 8], 4),
    ("SSC", [4, 5, 6], 3),
    ("SSSC", [2, 3, 4, 6], 2),
    ("CT", [8, 7], 2),
    ("SCT", [5, 6, 3], 3),
    ("C", [10], 5),
    ("BSSC", [4, 5, 12], 4),      # NHWC when row-major
    ("BCSS", [12, 4, 5], 6),      # NCHW when row-major
    ("CSSB", [8, 3, 5], 2),
    ("TBC", [6, 9], 3),
    ("BTC", [5, 8], 4),
    ("SCUB", [4, 6, 3], 3),
    ("USSCB", [2, 3, 3, 4], 2),
    ("CUT", [6, 3, 4], 1),
    ("BSC", [7, 6], 6),           # B fastest in column-major
    ("SBSC", [3, 4, 6], 2),       # B between two S dims
]
LAYOUTS = ["column-major", "row-major"]
IDS = [f[0] for f in FORMATS]


def _layer(fmt, size, groups, layout, dtype, i):
    return make_layer(name=f"l{i}_{fmt.lower()}", format=fmt, input_size=size,
                      num_groups=groups, layout=layout, dtype=dtype, epsilon=1e-3,
                      scale_initializer="narrow-normal", offset_initializer="narrow-normal",
                      seed=i)


def _input(layer, batch, rng):
    numel = layer.observation_numel * batch
    return round_to_dtype(rng.normal(0.5, 2.0, numel), layer.dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("fmt,size,groups", FORMATS, ids=IDS)
def test_reference_matches_torch(fmt, size, groups, layout, rng):
    layer = _layer(fmt, size, groups, layout, "double", 0)
    batch = 3 if layer.has_batch else 1
    x = _input(layer, batch, rng)
    scale = rng.normal(1, 0.3, layer.num_channels)
    offset = rng.normal(0, 0.3, layer.num_channels)
    ref = group_norm_reference(x, layer, batch, scale, offset)
    oracle = torch_group_norm(x, layer, batch, scale, offset)
    np.testing.assert_allclose(ref, oracle, rtol=0, atol=1e-12)


def test_reference_layout_is_memory_order():
    """Column-major SSCB puts (h, w, c, b) at h + H*w + H*W*c + H*W*C*b (the memory layout rule)."""
    layer = make_layer(format="SSCB", input_size=[2, 3, 4], num_groups=2)
    x = np.zeros(2 * 3 * 4 * 2)
    x[1 + 2 * 2 + 2 * 3 * 3 + 2 * 3 * 4 * 1] = 1.0   # h=1, w=2, c=3, b=1 (group 1 of b=1)
    y = group_norm_reference(x, layer, 2)
    changed = np.flatnonzero(y)
    # Only observation 1, group 1 (channels 2, 3) is non-constant, so only it is non-zero.
    expected = [h + 2 * w + 6 * c + 24 for c in (2, 3) for w in range(3) for h in range(2)]
    assert sorted(changed) == expected


@pytest.fixture(scope="module", params=[(lay, dt) for lay in LAYOUTS
                                        for dt in ("single", "double")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def built(request):
    layout, dtype = request.param
    layers = [_layer(f, s, g, layout, dtype, i) for i, (f, s, g) in enumerate(FORMATS)]
    plans, module = build_layers(*layers)
    return dict(zip(IDS, zip(layers, plans))), module


@pytest.mark.parametrize("fmt", IDS)
def test_generated_c_matches_torch(built, fmt, rng):
    by_fmt, module = built
    layer, plan = by_fmt[fmt]
    run = c_runner(plan, module)
    tol = DTYPES[layer.dtype].tolerance
    batches = [1, 4] if layer.has_batch else [1]
    scale = round_to_dtype(layer.scale, layer.dtype)
    offset = round_to_dtype(layer.offset, layer.dtype)
    for batch in batches:
        for in_place in (False, True):
            x = _input(layer, batch, rng)
            y = run(Case("t", x.copy(), batch, in_place=in_place))
            oracle = torch_group_norm(x, layer, batch, scale, offset)
            ref = group_norm_reference(x, layer, batch, scale, offset)
            assert compare(y, ref, tol, "ref").passed, compare(y, ref, tol, "ref")
            # torch computes in the layer's dtype too, so allow both errors side by side.
            result = compare(y, oracle, 2 * tol, "torch")
            assert result.passed, (batch, in_place, result)
