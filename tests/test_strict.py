"""Strict flags: every generated .c compiles without a warning under
-std=c99 -Wall -Wextra -Wpedantic -Wconversion -Wdouble-promotion -Wshadow -Wcast-qual
-Wstrict-prototypes -Werror with gcc, clang, arm-none-eabi-gcc (Cortex-M4F, M7, M55) and the
AArch64 cross compiler at -O0, -Os and -O3, and header plus source compile as C++.

A missing compiler fails the test with the package to install; nothing is skipped.
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import pytest

from gncodegen.targets import firmware as fw
from gncodegen.errors import BuildError
from gncodegen.plan import lower, lower_spec
from gncodegen.render import Source
from gncodegen.targets.c import render_c
from gncodegen.pipeline import load_spec
from gncodegen.targets import TARGETS

from conftest import EXAMPLES, make_layer

# Shapes the examples do not have: three spatial dims, a U dim, one group, no B, one element
# per group, double with a runtime stride, tiny groups (the AVX-512 kernel), fused
# activations, runtime sizes.
EXTRA_LAYERS = {
    "sssc_3d": dict(name="s_3d", num_groups=2, format="SSSCB", input_size=[3, 2, 2, 4]),
    "u_dim": dict(name="s_u", num_groups=1, format="CUB", layout="row-major",
                  input_size=[4, 3]),
    "no_batch_one_group": dict(name="s_nob", num_groups="all-channels", format="SC",
                               input_size=[5, 3]),
    "one_element_groups": dict(name="s_cw", num_groups="channel-wise", format="CB",
                               input_size=[3]),
    "double_cbt": dict(name="s_f64", num_groups=3, format="CBT", input_size=[6, 4],
                       dtype="double"),
    "tiny_groups": dict(name="s_tiny", num_groups=8, format="BC", layout="row-major",
                        input_size=[256]),
    # Fused activations: the source's own e^x and erf in single precision, the math
    # library's in double (its loops unmarked), a piecewise one on a runtime size.
    "swish": dict(name="s_swish", num_groups=2, format="SSCB", input_size=[4, 3, 4],
                  activation="swish"),
    "gelu_rows": dict(name="s_gelu", num_groups=2, format="BSSC", layout="row-major",
                      input_size=[3, 3, 8], activation="gelu"),
    "elu_tanh_double": dict(name="s_elu64", num_groups=2, format="CBT", input_size=[4, 5],
                            dtype="double", activation={"type": "gelu", "approximation": "tanh"}),
    "clipped_runtime": dict(name="s_clip", num_groups=2, format="SCB", layout="row-major",
                            input_size=[None, 6], activation={"type": "clipped-relu",
                                                              "ceiling": 6}),
    "runtime_sizes": dict(name="s_rt", num_groups=2, format="SSCB",
                          input_size=[None, {"max": 9}, 4]),
    # The skip and the modulation on each kernel kind (runs, rows, strided, runtime sizes).
    "diffusion_runs": dict(name="s_dif", num_groups=2, format="BCSS", layout="row-major",
                           input_size=[4, 3, 3], skip=True, adaptive=True, activation="swish"),
    "skip_rows": dict(name="s_skr", num_groups=2, format="BSSC", layout="row-major",
                      input_size=[3, 3, 8], skip=True),
    "adaptive_strided_double": dict(name="s_ada64", num_groups=3, format="SSCB",
                                    layout="row-major", input_size=[3, 2, 6], adaptive=True,
                                    dtype="double"),
    "fused_runtime": dict(name="s_furt", num_groups=2, format="CBT", input_size=[4, None],
                          skip=True, adaptive=True),
}


def _source_sets():
    sets = []
    for path in sorted(EXAMPLES.glob("*.yaml")):
        spec = load_spec(path)
        sets.append((path.stem, TARGETS["c"].render(spec, tuple(TARGETS["c"].lower(p) for p in lower_spec(spec)))))
    for key, keys in EXTRA_LAYERS.items():
        sets.append((key, list(render_c(lower(make_layer(**keys)), "test.yaml"))))
    return sets


SOURCE_SETS = _source_sets()


@pytest.mark.parametrize("opt", fw.STRICT_OPTS)
@pytest.mark.parametrize("config", fw.STRICT_CONFIGS, ids=lambda c: c.label)
@pytest.mark.parametrize("name, sources", SOURCE_SETS, ids=[s[0] for s in SOURCE_SETS])
def test_generated_c_compiles_without_warnings(name, sources, config, opt):
    fw.check_strict(sources, config, opt)


def test_a_warning_fails_with_the_command_and_the_compiler_output():
    plan = lower(make_layer(name="warned", num_groups=2, format="SSCB", input_size=[2, 2, 4]))
    header, source = render_c(plan, "test.yaml")
    # An implicit float -> double promotion: -Wdouble-promotion must turn it into an error.
    assert "#include <math.h>\n" in source.text
    # (Not through sqrtf: at -Os on Cortex-M4 the kernel takes vsqrt.f32 and never calls it.)
    promoted = ("#include <math.h>\nfloat warned_root(float v);\n"
                "float warned_root(float v) { return (float)sqrt(v * 1.0); }\n")
    bad = Source(source.name, source.text.replace("#include <math.h>\n", promoted, 1))
    gcc = next(c for c in fw.STRICT_CONFIGS if c.label == "cortex-m4")
    with pytest.raises(BuildError) as info:
        fw.check_strict([header, bad], gcc, "-Os")
    message = str(info.value)
    assert message.startswith("warned.c (cortex-m4 -Os): compile failed: arm-none-eabi-gcc ")
    assert "-Wdouble-promotion" in message and "-Werror" in message
    assert "[-Werror=double-promotion]" in message
    assert info.value.command[0] == "arm-none-eabi-gcc"


def test_header_alone_is_valid_cxx():
    # A C++ firmware includes only the header; it must declare the entry points with C linkage.
    plan = lower(make_layer(name="cxx_user", num_groups=2, format="SSCB", input_size=[2, 2, 4]))
    header, _ = render_c(plan, "test.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, header.name).write_text(header.text)
        Path(tmp, "user.cpp").write_text(
            '#include "cxx_user.h"\n'
            "int use(const float *x, float *y) { return cxx_user_predict(x, y, 1u); }\n")
        proc = subprocess.run([fw.require_tool("g++"), "-std=c++11", "-Wall", "-Wextra",
                               "-Werror", "-c", "user.cpp", "-o", "user.o"], cwd=tmp,
                              capture_output=True, text=True, check=False)
        assert proc.returncode == 0, proc.stderr
        nm = subprocess.run(["nm", "-u", "user.o"], cwd=tmp, capture_output=True, text=True,
                            check=True).stdout
    assert "U cxx_user_predict" in nm   # not a mangled C++ name
