"""Valid specs: every key a spec takes, MATLAB aliases, files and initializers."""

from __future__ import annotations

import math
import sys
import textwrap
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from gncodegen.errors import SpecError
from gncodegen.pipeline import load_spec, parse_spec
from gncodegen.yamlspec import MAX_VALUES, load_yaml

from conftest import EXAMPLES, make_layer


def _spec(tmp_path: Path, text: str, name: str = "layer.yaml", **kw):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return load_spec(path, **kw)


def test_matlab_property_names_and_defaults(tmp_path):
    spec = _spec(tmp_path, """
        NumGroups: 4
        NumChannels: 20
        Epsilon: 2e-5
        format: SSCB
        input_size: [24, 24, 20]
        ScaleLearnRateFactor: 2
        OffsetLearnRateFactor: 0.5
        ScaleL2Factor: 0
        OffsetL2Factor: 3
    """, name="my_layer.yaml")
    (layer,) = spec.layers
    assert layer.name == "my_layer"                     # the file stem
    assert (layer.num_groups, layer.num_channels) == (4, 20)
    assert layer.epsilon == 2e-5                         # a number (YAML 1.2), not a string
    assert layer.layout == "column-major" and layer.dtype == "single"
    assert layer.scale == (1.0,) * 20 and layer.offset == (0.0,) * 20
    assert (layer.scale_learn_rate_factor, layer.offset_learn_rate_factor) == (2.0, 0.5)
    assert (layer.scale_l2_factor, layer.offset_l2_factor) == (0.0, 3.0)
    assert layer.channels_per_group == 5 and layer.observation_numel == 24 * 24 * 20


@pytest.mark.parametrize("word,groups", [("all-channels", 1), ("allchannels", 1),
                                         ("channel-wise", 6), ("channelwise", 6),
                                         ("All-Channels", 1), (3, 3)])
def test_num_groups_words(word, groups):
    layer = make_layer(num_groups=word, format="CB", input_size=[6])
    assert layer.num_groups == groups


def test_defaults_epsilon_and_auto_channels():
    layer = make_layer(num_groups=2, format="CBT", input_size=[8, 3], num_channels="auto")
    assert layer.epsilon == 1e-5 and layer.num_channels == 8 and layer.has_batch


def test_batchless_format():
    layer = make_layer(num_groups=1, format="SSC", input_size=[3, 4, 2])
    assert not layer.has_batch


@pytest.mark.parametrize("word", ["narrow-normal", "narrownormal"])
def test_narrow_normal_is_seeded(word):
    a = make_layer(num_groups=1, format="CB", input_size=[64], scale_initializer=word, seed=5)
    b = make_layer(num_groups=1, format="CB", input_size=[64], scale_initializer=word, seed=5)
    c = make_layer(num_groups=1, format="CB", input_size=[64], scale_initializer=word, seed=6)
    assert a.scale == b.scale != c.scale
    assert abs(np.std(a.scale) - 0.01) < 0.004 and abs(np.mean(a.scale)) < 0.005


def test_initializer_mapping_with_own_seed():
    a = make_layer(num_groups=1, format="CB", input_size=[8],
                   offset_initializer={"name": "narrow-normal", "seed": 9})
    b = make_layer(num_groups=1, format="CB", input_size=[8], seed=9,
                   offset_initializer="narrow-normal")
    assert a.offset == b.offset
    assert a.offset != make_layer(num_groups=1, format="CB", input_size=[8], seed=9,
                                  scale_initializer="narrow-normal").scale


def test_initializer_ones_zeros_swapped():
    layer = make_layer(num_groups=1, format="CB", input_size=[3], scale_initializer="zeros",
                       offset_initializer="ones")
    assert layer.scale == (0.0,) * 3 and layer.offset == (1.0,) * 3


def test_explicit_parameters_win_over_initializers():
    layer = make_layer(num_groups=1, format="CB", input_size=[3], scale=[1, 2, 3],
                       scale_initializer="zeros", offset=[[0.5], [0.25], [0]])
    assert layer.scale == (1.0, 2.0, 3.0) and layer.offset == (0.5, 0.25, 0.0)


def test_parameters_from_npy_npz_mat(tmp_path):
    from scipy.io import savemat

    np.save(tmp_path / "s.npy", np.arange(4, dtype=np.float32).reshape(1, 1, 4))
    np.savez(tmp_path / "p.npz", off=np.full(4, 0.5))
    savemat(tmp_path / "w.mat", {"gamma": np.ones((1, 1, 4)) * 2})
    layer = make_layer(tmp_path, num_groups=2, format="SCB", input_size=[3, 4],
                       scale={"file": "s.npy"}, offset={"file": "p.npz", "key": "off"})
    assert layer.scale == (0.0, 1.0, 2.0, 3.0) and layer.offset == (0.5,) * 4
    layer = make_layer(tmp_path, num_groups=2, format="SCB", input_size=[3, 4],
                       scale={"file": "w.mat", "var": "gamma"})
    assert layer.scale == (2.0,) * 4


def test_callable_initializer_needs_allow_code(tmp_path, monkeypatch):
    (tmp_path / "my_init.py").write_text("import numpy as np\n"
                                         "def twos(sz):\n    return np.full(sz, 2.0)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    keys = dict(num_groups=1, format="CB", input_size=[3], scale_initializer="my_init:twos")
    with pytest.raises(SpecError, match="scale_initializer: .*--allow-code"):
        make_layer(**keys)
    assert make_layer(allow_code=True, **keys).scale == (2.0,) * 3
    sys.modules.pop("my_init", None)


def test_layers_file(tmp_path):
    spec = _spec(tmp_path, """
        layers:
          - {name: a, num_groups: 2, format: CB, input_size: [4]}
          - {num_groups: 1, format: SSC, input_size: [2, 2, 3], dtype: double}
    """, name="net.yaml")
    assert [l.name for l in spec.layers] == ["a", "net_1"]
    assert spec.layers[1].dtype == "double"


def test_errors_name_the_layer_in_multi_layer_files(tmp_path):
    with pytest.raises(SpecError, match=r"^layers\[1\]\.num_groups: 3 does not divide"):
        _spec(tmp_path, """
            layers:
              - {name: a, num_groups: 2, format: CB, input_size: [4]}
              - {name: b, num_groups: 3, format: CB, input_size: [4]}
        """)


def test_spec_hash_is_of_the_bytes(tmp_path):
    import hashlib

    text = "num_groups: 1\nformat: CB\ninput_size: [2]\n"
    spec = _spec(tmp_path, text)
    assert spec.sha256 == hashlib.sha256(text.encode()).hexdigest()


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.stem)
def test_examples_load(path):
    assert load_spec(path).layers


def test_parse_spec_relative_files_resolve_against_spec_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    np.save(tmp_path / "sub" / "s.npy", np.ones(2))
    spec = parse_spec("num_groups: 1\nformat: CB\ninput_size: [2]\nscale: {file: s.npy}\n",
                      tmp_path / "sub", "sub_layer")
    assert spec.layers[0].scale == (1.0, 1.0)


def test_mat_without_scipy_says_how_to_get_it(tmp_path, monkeypatch):
    from scipy.io import savemat

    savemat(tmp_path / "w.mat", {"gamma": np.ones(4)})
    monkeypatch.setitem(sys.modules, "scipy.io", None)     # import now fails as if missing
    with pytest.raises(SpecError, match=r"^scale\.file: reading \.mat files needs scipy: "
                                        r"pip install 'gncodegen\[mat\]'$"):
        make_layer(tmp_path, num_groups=2, format="CB", input_size=[4],
                   scale={"file": "w.mat", "var": "gamma"})


# --------------------------------------------------------------------------- YAML 1.2, bounded


@pytest.mark.parametrize("text,value", [
    ("1e-5", 1e-5), ("1E3", 1000.0), ("+.5", 0.5), ("5.", 5.0), ("-1.5e+3", -1500.0),
    (".inf", math.inf), ("-.Inf", -math.inf), ("0x1F", 31), ("0o17", 15), ("10", 10),
    ("-0", 0), ("true", True), ("FALSE", False), ("~", None), ("null", None), ("", None),
    ("yes", "yes"), ("on", "on"), ("1:0", "1:0"), ("1_0", "1_0"), ("1_0e-5", "1_0e-5"),
    ("0b101", "0b101"), ("2001-12-14", "2001-12-14"), ("'1e-5'", "1e-5"), ("!!float 3", 3.0),
    ("!!str 3", "3"), ("!!int 0x10", 16),
])
def test_yaml_core_schema_scalars(text, value):
    """Plain scalars resolve as YAML 1.2's core schema says, whatever YAML 1.1 would do."""
    assert load_yaml(f"v: {text}\n") == {"v": value}


def test_number_forms_are_numbers_everywhere():
    """1e-5 is a number in a parameter list as much as in epsilon."""
    layer = make_layer(num_groups=1, format="CB", input_size=[2], epsilon=2e-5,
                       scale=[1e-5, 2.5e-1])
    assert layer.scale == (1e-5, 0.25) and layer.epsilon == 2e-5
    spec = parse_spec("num_groups: 0x2\nformat: CB\ninput_size: [4]\nepsilon: 1e-3\n"
                      "scale: [1e-5, 1e-5, .5, 1]\n", Path("."), "t")
    assert spec.layers[0].num_groups == 2 and spec.layers[0].scale == (1e-5, 1e-5, 0.5, 1.0)


def test_merge_keys_merge(tmp_path):
    """`<<` merges a mapping (or a list of them): written keys win, earlier merges next."""
    spec = _spec(tmp_path, """
        layers:
          - &base {name: a, num_groups: 2, format: CB, input_size: [4], epsilon: 1e-3}
          - <<: *base
            name: b
            epsilon: 1e-4
          - <<: [{name: c, dtype: double}, *base]
    """, name="net.yaml")
    a, b, c = spec.layers
    assert (b.name, b.num_groups, b.epsilon) == ("b", 2, 1e-4)
    assert (c.name, c.dtype, c.epsilon, c.input_size) == ("c", "double", 1e-3, (4,))
    assert a.epsilon == 1e-3


def test_aliases_share_values(tmp_path):
    """An anchor used again is the same list, counted each time against the limit."""
    spec = _spec(tmp_path, """
        num_groups: 1
        format: CB
        input_size: [3]
        scale: &p [0.5, 1, 2]
        offset: *p
    """)
    assert spec.layers[0].scale == spec.layers[0].offset == (0.5, 1.0, 2.0)


def _laughs(levels: int) -> str:
    text = "&a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"
    for k in range(1, levels):
        text = f"&a{k} [{text}" + f", *a{k - 1}" * 9 + "]"
    return text


@pytest.mark.parametrize("value", [_laughs(9), _laughs(30), "&a [*a]", "&a [1, [2, *a]]",
                                   "[" * 100_000 + "]" * 100_000])
def test_hostile_yaml_is_refused_fast(value):
    """Bombs, recursive aliases and deep nesting: refused in well under a second each."""
    started = time.monotonic()
    with pytest.raises(SpecError, match=r"^(scale|spec): .*(expands|recursive|nested)"):
        parse_spec(f"num_groups: 1\nformat: CB\ninput_size: [8]\nscale: {value}\n",
                   Path("."), "t")
    assert time.monotonic() - started < 2.0


def test_value_limit_is_far_above_real_specs():
    """A list just under the limit loads; one more value is refused."""
    assert MAX_VALUES >= 1 << 20
    text = "v: [" + ", ".join(["1"] * 1000) + "]\n"
    assert len(load_yaml(text)["v"]) == 1000


def test_error_preview_is_bounded():
    """A value aliases make wide is shown in a message without being formatted whole."""
    started = time.monotonic()
    with pytest.raises(SpecError) as info:
        parse_spec(f"num_groups: 1\nformat: CB\ninput_size: [8]\nepsilon: {_laughs(6)}\n",
                   Path("."), "t")
    assert len(str(info.value)) < 120 and time.monotonic() - started < 2.0


# --------------------------------------------------------------------------- files


def test_mat_reads_only_the_named_variable(tmp_path):
    """An unrelated large variable beside the parameters is skipped, not decompressed (scipy
    reads one zlib block of its header, a bounded cost)."""
    from scipy.io import savemat

    big = np.random.default_rng(0).random(2_000_000)          # 16 MB that zlib cannot shrink
    savemat(tmp_path / "w.mat", {"big": big, "gamma": np.full(8, 2.0)}, do_compression=True)
    tracemalloc.start()
    try:
        layer = make_layer(tmp_path, num_groups=2, format="CB", input_size=[8],
                           scale={"file": "w.mat", "var": "gamma"})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert layer.scale == (2.0,) * 8
    assert peak < 8_000_000, f"reading 8 values took {peak} bytes"


def test_mat_variable_of_the_wrong_size_is_not_read(tmp_path):
    from scipy.io import savemat

    savemat(tmp_path / "w.mat", {"gamma": np.ones(1000)})
    with pytest.raises(SpecError, match=r"^scale: must hold exactly num_channels=8 values.*"
                                        r"\(1, 1000\)"):
        make_layer(tmp_path, num_groups=2, format="CB", input_size=[8],
                   scale={"file": "w.mat", "var": "gamma"})


@pytest.mark.parametrize("make", ["fifo", "folder", "device", "too-large", "missing"])
def test_spec_must_be_a_regular_file(tmp_path, make):
    """A FIFO, a folder, /dev/zero or a huge file is refused before it is read."""
    path = tmp_path / "layer.yaml"
    if make == "fifo":
        import os
        os.mkfifo(path)
    elif make == "folder":
        path.mkdir()
    elif make == "device":
        path = Path("/dev/zero")
    elif make == "too-large":
        with open(path, "wb") as fh:
            fh.truncate(17 << 20)
    rule = {"fifo": r"not a regular file: .* is a FIFO",
            "folder": r"not a regular file: .* is a folder",
            "device": r"not a regular file: /dev/zero is a device",
            "too-large": r".* is 17825792 bytes, more than the limit of 16777216",
            "missing": r"file not found"}[make]
    started = time.monotonic()
    with pytest.raises(SpecError, match=rf"^spec: {rule}"):
        load_spec(path)
    assert time.monotonic() - started < 2.0


def test_spec_file_name_not_utf8(tmp_path):
    path = tmp_path / "lay\udcffer.yaml"
    path.write_text("num_groups: 1\nformat: CB\ninput_size: [2]\n")
    with pytest.raises(SpecError, match=r"^spec: the file name holds byte 0xff"):
        load_spec(path)


@pytest.mark.parametrize("ch", ["\u202a", "\u202b", "\u202c", "\u202d", "\u202e", "\u2066",
                                "\u2067", "\u2068", "\u2069", "\u200e", "\u200f", "\u061c",
                                "\u200b", "\ufeff", "\u2028", "\x7f", "\ue000"])
def test_hidden_characters_never_reach_a_comment(tmp_path, ch):
    """Bidirectional controls and other invisible characters: refused in every field that
    generated comments repeat (spec file name, parameter path, npz key, mat var)."""
    from scipy.io import savemat

    name = f"p{ch}q"
    np.save(tmp_path / f"{name}.npy", np.ones(2))
    np.savez(tmp_path / "p.npz", **{name: np.ones(2)})
    savemat(tmp_path / "w.mat", {"v": np.ones(2)})
    (tmp_path / f"{name}.yaml").write_text("num_groups: 1\nformat: CB\ninput_size: [2]\n")
    with pytest.raises(SpecError, match=r"^spec: the file name holds "):
        load_spec(tmp_path / f"{name}.yaml")
    for param, fld in (({"file": f"{name}.npy"}, "scale.file"),
                       ({"file": "p.npz", "key": name}, "scale.key"),
                       ({"file": "w.mat", "var": name}, "scale.var")):
        with pytest.raises(SpecError, match=rf"^{fld}: holds "):
            make_layer(tmp_path, num_groups=1, format="CB", input_size=[2], scale=param)


def test_epsilon_bound_is_the_overflow_of_variance_plus_epsilon():
    """The largest epsilon accepted still leaves variance + epsilon finite for the largest
    variance, in the type the code computes in."""
    ok = make_layer(num_groups=1, format="CB", input_size=[2], epsilon=1e31)
    assert np.isfinite(np.float32(np.finfo(np.float32).max) + np.float32(ok.epsilon))
    with pytest.raises(SpecError, match=r"^epsilon: .*overflow"):
        make_layer(num_groups=1, format="CB", input_size=[2], epsilon=2.0 ** 103)
    with np.errstate(over="ignore"):
        assert np.isinf(np.float32(np.finfo(np.float32).max) + np.float32(2.0 ** 103))
    make_layer(num_groups=1, format="CB", input_size=[2], epsilon=1e291, dtype="double")
    with pytest.raises(SpecError, match=r"^epsilon: .*double"):
        make_layer(num_groups=1, format="CB", input_size=[2], epsilon=2.0 ** 970, dtype="double")


@pytest.mark.parametrize("text", [
    "v: [1e-5, 010]\n", "v: &a [*a]\n", "? [a]\n: 1\n", "v: " + _laughs(8) + "\n",
    "v: " + "[" * 40 + "]" * 40 + "\n", "a: {<<: [{x: 1}, {x: 2, y: 3}], z: 0}\n",
    "v: !!python/name:os.system\n", "a: 1\na: 2\n", "v: [yes, 1:0, 0x1f, .inf, ~]\n",
])
def test_pure_python_parser_reads_alike(text, monkeypatch):
    """Without libyaml the same documents give the same values and the same refusals."""
    import yaml

    def outcome():
        try:
            return ("ok", repr(load_yaml(text)))
        except SpecError as exc:
            return ("refused", str(exc).split(":")[0], str(exc).split(": ", 1)[1][:20])

    fast = outcome()
    monkeypatch.setattr(yaml, "__with_libyaml__", False)
    assert outcome() == fast
