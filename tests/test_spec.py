"""Valid specs: every key of DESIGN.md section 2, MATLAB aliases, files and initializers."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from gncodegen.errors import SpecError
from gncodegen.spec import load_spec, parse_spec

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
    assert layer.epsilon == 2e-5                         # "2e-5" is a string in YAML 1.1
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
                      tmp_path / "sub", "x")
    assert spec.layers[0].scale == (1.0, 1.0)


def test_mat_without_scipy_says_how_to_get_it(tmp_path, monkeypatch):
    from scipy.io import savemat

    savemat(tmp_path / "w.mat", {"gamma": np.ones(4)})
    monkeypatch.setitem(sys.modules, "scipy.io", None)     # import now fails as if missing
    with pytest.raises(SpecError, match=r"^scale\.file: reading \.mat files needs scipy: "
                                        r"pip install 'gncodegen\[mat\]'$"):
        make_layer(tmp_path, num_groups=2, format="CB", input_size=[4],
                   scale={"file": "w.mat", "var": "gamma"})
