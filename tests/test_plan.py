"""Plan values on their own: strides, loop nests, literals (the memory layout, and what the plan decides)."""

from __future__ import annotations

import numpy as np
import pytest

from gncodegen.plan import analyze_layout, lower, memory_dims
from gncodegen.targets.c.record import lower_c
from gncodegen.dtypes import DTYPES, c_literal, round_to_dtype

from conftest import make_layer


def _strides(layer):
    return {d.label: (d.stride, d.per_batch) for d in memory_dims(layer)}


def test_matlab_sscb_column_major_strides():
    layer = make_layer(format="SSCB", input_size=[24, 24, 20], num_groups=4)
    assert _strides(layer) == {"S1": (1, False), "S2": (24, False), "C": (576, False),
                               "B": (11520, False)}
    layout = analyze_layout(layer)
    assert layout.group_contiguous and not layout.channels_last
    assert [(lp.extent, lp.stride) for lp in layout.stats_loops] == [(5 * 576, 1)]
    assert [(lp.labels, lp.extent, lp.stride) for lp in layout.group_loops] == [
        ("C", 5, 576), ("S2*S1", 576, 1)]


def test_nchw_row_major_equals_sscb_column_major():
    nchw = make_layer(format="BCSS", layout="row-major", input_size=[20, 24, 24], num_groups=4)
    sscb = make_layer(format="SSCB", input_size=[24, 24, 20], num_groups=4)
    a, b = analyze_layout(nchw), analyze_layout(sscb)
    assert a.batch_stride == b.batch_stride == 11520
    assert [(l.extent, l.stride) for l in a.group_loops] == \
        [(l.extent, l.stride) for l in b.group_loops]


def test_nhwc_is_channels_last():
    layer = make_layer(format="BSSC", layout="row-major", input_size=[16, 16, 32], num_groups=8)
    layout = analyze_layout(layer)
    assert layout.channels_last and not layout.group_contiguous
    assert [(lp.extent, lp.stride, lp.is_channel) for lp in layout.group_loops] == [
        (256, 32, False), (4, 1, True)]


def test_cbt_column_major_time_stride_depends_on_batch():
    layer = make_layer(format="CBT", input_size=[12, 50], num_groups=3)
    layout = analyze_layout(layer)
    assert layout.batch_stride == 12
    (t_loop, c_loop) = layout.group_loops
    assert (t_loop.extent, t_loop.stride, t_loop.per_batch) == (50, 12, True)
    assert t_loop.stride_expr == "i_t_stride"
    assert layout.runtime_strides == (t_loop,)
    assert (c_loop.extent, c_loop.stride, c_loop.per_batch) == (4, 1, False)


def test_size_one_dims_are_dropped_and_neighbours_merge():
    layer = make_layer(format="SSSCB", input_size=[3, 1, 5, 8], num_groups=2)
    layout = analyze_layout(layer)
    assert layout.group_contiguous and layout.stats_loops[0].extent == 4 * 15


def test_plan_counts_and_literals():
    layer = make_layer(format="SSCB", input_size=[24, 24, 20], num_groups=4, epsilon=1e-5,
                       scale=[0.1] * 20)
    plan = lower(layer)
    assert (plan.group_numel, plan.channels_per_group, plan.observation_numel) == (2880, 5, 11520)
    assert plan.macro == "T" and plan.prefix == "t"
    rec = lower_c(plan)                  # the C target's literals
    assert rec.epsilon_literal == "1e-05f" or float(rec.epsilon_literal[:-1]) == np.float32(1e-5)
    assert rec.scale_literals[0] == "0.1f"
    assert np.float32(rec.inv_group_numel_literal[:-1]) == np.float32(1 / 2880)


@pytest.mark.parametrize("value", [0.1, 1.0, 1e-5, 3.4028234663852886e38, 1e-45, -2.5, 1e20,
                                   123456789.0, 2.0 ** -126])
@pytest.mark.parametrize("dtype", ["single", "double"])
def test_literals_round_trip_exactly(value, dtype):
    text = c_literal(value, dtype)
    if dtype == "single":
        assert text.endswith("f")
        assert np.float32(float(text[:-1])) == np.float32(value)
    else:
        assert float(text) == value
    assert "." in text or "e" in text    # never an integer literal with an f suffix


def test_round_to_dtype_bfloat16_rounds_to_nearest_even():
    assert round_to_dtype([1.0 + 2 ** -8], "bfloat16")[0] == 1.0        # tie, to even
    assert round_to_dtype([1.0 + 3 * 2 ** -8], "bfloat16")[0] == 1.0 + 2 ** -6


def test_rescue_exponent_grows_past_2_28_elements_a_group():
    """The C kernels scale d by 2^-e in the rescue: the type's own e up to 2^28 elements a
    group, more past it, so numel squares of |d| * 2^-e <= 2 * FLT_MAX * 2^-e stay finite."""
    single, double = DTYPES["single"], DTYPES["double"]
    assert single.rescue_exponent_for(2**28) == single.rescue_exponent == 80
    assert double.rescue_exponent_for(2**40) == double.rescue_exponent == 560
    for numel in (2**29, 2**30, 2**34, 2**40):
        e = single.rescue_exponent_for(numel)
        assert (2 * 3.4028235e38 * 2.0**-e) ** 2 * numel <= 3.4028235e38 / 2
        assert e >= 80
