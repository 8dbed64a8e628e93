"""`gncodegen import`: ONNX models (PyTorch's exporter at old and new opsets, hand-built graphs
of every operator it reads) and torch.export programs become specs that build and verify, and
whose compiled layers give what ONNX Runtime or PyTorch give on the same input."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

import gncodegen
from gncodegen.cli import main
from gncodegen.importer import ImportFailed, import_model, layer_name
from gncodegen.reference import group_norm_reference, to_flat, to_logical

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402


def _close(ours, theirs, tol=2e-5):
    theirs = np.asarray(theirs, dtype=np.float64)
    assert np.asarray(ours).shape == theirs.shape
    assert np.max(np.abs(ours - theirs)) <= tol * max(1.0, np.max(np.abs(theirs)))


def _hand_model(tmp_path, op="GroupNormalization", domain="", opset=18, channels=8, groups=4,
                per_group=True, shape=("n", 8, 5, 6), attrs=None, inputs=("x", "s", "b"),
                after=None, extra_inputs=(), outputs=("y",)):
    """Write a one-node ONNX model (and an activation after it) and return its path."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))
    count = groups if per_group else channels
    inits = [numpy_helper.from_array(np.linspace(0.5, 1.5, count).astype(np.float32), "s"),
             numpy_helper.from_array(np.linspace(-1, 1, count).astype(np.float32), "b")]
    graph_inputs = [x] + [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(shape))
                          for n in extra_inputs]
    node = helper.make_node(op, list(inputs), list(outputs), domain=domain, name="block/norm",
                            **(attrs or {"num_groups": groups, "epsilon": 1e-5}))
    nodes, out = [node], outputs[0]
    if after == "swish":
        nodes += [helper.make_node("Sigmoid", [out], ["sg"]),
                  helper.make_node("Mul", [out, "sg"], ["z"])]
        out = "z"
    elif after is not None:
        nodes.append(helper.make_node(after, [out], ["z"]))
        out = "z"
    graph = helper.make_graph(nodes, "g", graph_inputs,
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], inits)
    ops = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    path = tmp_path / f"m_{op}_{opset}.onnx"
    onnx.save(helper.make_model(graph, opset_imports=ops), str(path))
    return path


def _ort(path, feeds):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


# --------------------------------------------------------------------------- ONNX operators


@pytest.mark.parametrize("opset,per_group", [(18, True), (21, False)])
def test_group_normalization_matches_onnx_runtime(tmp_path, opset, per_group):
    path = _hand_model(tmp_path, opset=opset, per_group=per_group, after="swish")
    result = import_model(path, tmp_path / "out")
    (item,) = result.found
    assert item.keys["format"] == "BCSS" and item.keys["input_size"] == [8, 5, 6]
    assert item.keys["activation"] == "swish" and item.scale.size == 8
    lib = gncodegen.compile(result.spec_path)
    x = np.random.default_rng(0).normal(2.0, 3.0, (3, 8, 5, 6)).astype(np.float32)
    _close(lib["block_norm"](x), _ort(path, {"x": x}))


def test_opset_18_per_group_values_expand_to_their_channels(tmp_path):
    result = import_model(_hand_model(tmp_path, opset=18, per_group=True), tmp_path / "o")
    scale = result.found[0].scale
    assert np.array_equal(scale, np.repeat(np.linspace(0.5, 1.5, 4).astype(np.float32), 2))


@pytest.mark.parametrize("after,kind", [("Relu", "relu"), ("Tanh", "tanh"),
                                        ("Sigmoid", "sigmoid")])
def test_an_activation_that_is_the_only_consumer_is_fused(tmp_path, after, kind):
    path = _hand_model(tmp_path, opset=21, per_group=False, after=after)
    result = import_model(path, tmp_path / "o")
    assert result.found[0].keys["activation"] == kind
    lib = gncodegen.compile(result.spec_path)
    x = np.random.default_rng(1).normal(size=(2, 8, 5, 6)).astype(np.float32)
    _close(lib["block_norm"](x), _ort(path, {"x": x}))


def test_symbolic_sizes_become_runtime_sizes(tmp_path):
    path = _hand_model(tmp_path, opset=21, per_group=False, shape=("n", 8, "h", "w"))
    result = import_model(path, tmp_path / "o")
    assert result.found[0].keys["input_size"] == [8, None, None]
    lib = gncodegen.compile(result.spec_path)
    for hw in ((3, 7), (9, 4)):
        x = np.random.default_rng(2).normal(size=(2, 8, *hw)).astype(np.float32)
        _close(lib["block_norm"](x), _ort(path, {"x": x}))
    # --input-shape fixes them instead
    fixed = import_model(path, tmp_path / "f", ("x=?x8x6x6",))
    assert fixed.found[0].keys["input_size"] == [8, 6, 6]


def _reference(x_nhwc, groups, gamma, beta, eps, skip=None, swish=False):
    """ONNX Runtime's contrib GroupNorm (channels last) in float64, from its definition."""
    x = x_nhwc.astype(np.float64) + (0 if skip is None else skip.astype(np.float64))
    n, c = x.shape[0], x.shape[-1]
    g = x.reshape(n, -1, groups, c // groups)
    mean = g.mean(axis=(1, 3), keepdims=True)
    var = g.var(axis=(1, 3), keepdims=True)
    y = ((g - mean) / np.sqrt(var + eps)).reshape(x.shape) * gamma + beta
    return y / (1 + np.exp(-y)) if swish else y


def test_com_microsoft_group_norm_channels_last_with_swish(tmp_path):
    # ONNX Runtime runs this contrib operator on GPUs only: checked against its definition.
    path = _hand_model(tmp_path, op="GroupNorm", domain="com.microsoft", per_group=False,
                       shape=("n", 5, 6, 8), attrs={"groups": 4, "epsilon": 1e-5,
                                                    "activation": 1})
    result = import_model(path, tmp_path / "o")
    keys = result.found[0].keys
    assert keys["format"] == "BSSC" and keys["input_size"] == [5, 6, 8]
    assert keys["activation"] == "swish"
    lib = gncodegen.compile(result.spec_path)
    x = np.random.default_rng(3).normal(size=(2, 5, 6, 8)).astype(np.float32)
    gamma, beta = np.linspace(0.5, 1.5, 8), np.linspace(-1, 1, 8)
    _close(lib["block_norm"](x), _reference(x, 4, gamma, beta, 1e-5, swish=True))


def test_com_microsoft_skip_group_norm_fuses_the_skip(tmp_path):
    path = _hand_model(tmp_path, op="SkipGroupNorm", domain="com.microsoft", per_group=False,
                       shape=("n", 5, 6, 8), attrs={"groups": 4, "epsilon": 1e-5,
                                                    "activation": 0},
                       inputs=("x", "s", "b", "k"), extra_inputs=("k",), outputs=("y", "sum"))
    result = import_model(path, tmp_path / "o")
    assert result.found[0].keys["skip"] is True
    lib = gncodegen.compile(result.spec_path)
    rng = np.random.default_rng(4)
    x, k = (rng.normal(size=(2, 5, 6, 8)).astype(np.float32) for _ in range(2))
    y, total = lib["block_norm"](x, skip=k, sum=True)
    _close(y, _reference(x, 4, np.linspace(0.5, 1.5, 8), np.linspace(-1, 1, 8), 1e-5, skip=k))
    assert np.array_equal(total, x + k)


def test_group_norm_with_its_own_swish_fuses_no_activation_after_it(tmp_path):
    path = _hand_model(tmp_path, op="GroupNorm", domain="com.microsoft", per_group=False,
                       shape=("n", 5, 6, 8), attrs={"groups": 4, "epsilon": 1e-5,
                                                    "activation": 1}, after="Relu")
    result = import_model(path, tmp_path / "o")
    assert result.found[0].keys["activation"] == "swish"
    assert "Relu" not in result.found[0].fused


def test_skip_group_norm_with_a_broadcast_skip_is_reported_not_imported(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, 6, 8])
    k = helper.make_tensor_value_info("k", TensorProto.FLOAT, [2, 8])
    inits = [numpy_helper.from_array(np.ones(8, np.float32), "s"),
             numpy_helper.from_array(np.zeros(8, np.float32), "b")]
    node = helper.make_node("SkipGroupNorm", ["x", "s", "b", "k"], ["y"], domain="com.microsoft",
                            groups=4, epsilon=1e-5, activation=0)
    graph = helper.make_graph([node], "g", [x, k], [helper.make_tensor_value_info("y", 1, None)],
                              inits)
    path = tmp_path / "bskip.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                      helper.make_opsetid("com.microsoft", 1)]),
              str(path))
    with pytest.raises(ImportFailed, match="not shaped like its input"):
        import_model(path, tmp_path / "o")


def test_skip_group_norm_with_a_bias_is_reported_not_imported(tmp_path):
    path = _hand_model(tmp_path, op="SkipGroupNorm", domain="com.microsoft", per_group=False,
                       shape=("n", 5, 6, 8), attrs={"groups": 4, "epsilon": 1e-5,
                                                    "activation": 0},
                       inputs=("x", "s", "b", "k", "s"), extra_inputs=("k",))
    with pytest.raises(ImportFailed, match="bias input"):
        import_model(path, tmp_path / "o")


# --------------------------------------------------------------------------- PyTorch's exporters


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.norm1 = torch.nn.GroupNorm(8, 32)
        self.norm2 = torch.nn.GroupNorm(4, 32, eps=1e-6)

    def forward(self, x):
        return torch.relu(self.norm2(torch.nn.functional.silu(self.norm1(x))))


def _trained():
    torch.manual_seed(0)
    block = _Block().eval()
    with torch.no_grad():
        for gn in (block.norm1, block.norm2):
            gn.weight.normal_(1.0, 0.3)
            gn.bias.normal_(0.0, 0.3)
    return block


@pytest.mark.parametrize("opset", [13, 17, 18])
def test_torch_onnx_exporter_models_match_onnx_runtime(tmp_path, opset):
    block = _trained()
    x = torch.randn(2, 32, 6, 5)
    path = tmp_path / f"block{opset}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(block, (x,), str(path), opset_version=opset, dynamo=False,
                          input_names=["x"], dynamic_axes={"x": {0: "n"}})
    result = import_model(path, tmp_path / "o")
    names = [layer["name"] for layer in yaml.safe_load(result.spec_path.read_text())["layers"]]
    assert names == ["norm1", "norm2"]
    assert [f.keys.get("activation") for f in result.found] == ["swish", "relu"]
    lib = gncodegen.compile(result.spec_path)
    xs = x.numpy()
    h = lib["norm1"](xs)
    # the second layer's input is the first's output; ONNX Runtime runs both
    _close(lib["norm2"](h), _ort(path, {"x": xs}))
    _close(lib["norm2"](h), block(x).detach().numpy())


def test_torch_dynamo_exporter_model_matches_onnx_runtime(tmp_path):
    """PyTorch's newer exporter (torch.onnx.export(dynamo=True), through onnxscript) names
    the modules in the nodes' metadata."""
    pytest.importorskip("onnxscript")
    block = _trained()
    x = torch.randn(2, 32, 6, 5)
    path = tmp_path / "block_dynamo.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(block, (x,), str(path), dynamo=True, verbose=False,
                          dynamic_shapes={"x": {0: torch.export.Dim("n")}})
    result = import_model(path, tmp_path / "o")
    names = [layer["name"] for layer in yaml.safe_load(result.spec_path.read_text())["layers"]]
    assert names == ["norm1", "norm2"]
    lib = gncodegen.compile(result.spec_path)
    _close(lib["norm2"](lib["norm1"](x.numpy())), _ort(path, {"x": x.numpy()}))


def test_torch_export_program_matches_pytorch(tmp_path):
    block = _trained()
    x = torch.randn(2, 32, 6, 5)
    dims = {"x": {0: torch.export.Dim("n"), 2: torch.export.Dim("h"),
                  3: torch.export.Dim("w")}}
    path = tmp_path / "block.pt2"
    torch.export.save(torch.export.export(block, (x,), dynamic_shapes=dims), str(path))
    result = import_model(path, tmp_path / "o")
    assert [f.keys["input_size"] for f in result.found] == [[32, None, None]] * 2
    assert [f.keys["epsilon"] for f in result.found] == [1e-5, 1e-6]
    lib = gncodegen.compile(result.spec_path)
    for shape in ((2, 32, 6, 5), (1, 32, 3, 9)):
        xs = torch.randn(*shape)
        _close(lib["norm2"](lib["norm1"](xs.numpy())), block(xs).detach().numpy())


# --------------------------------------------------------------------------- the command


def test_two_commands_from_model_to_verified_c(tmp_path):
    path = _hand_model(tmp_path, opset=21, per_group=False, after="Relu")
    out = tmp_path / "spec"
    run = CliRunner().invoke(main, ["import", str(path), "-o", str(out)])
    assert run.exit_code == 0, run.output
    assert "block_norm" in run.output and "Relu" in run.output
    built = CliRunner().invoke(main, ["build", str(out / f"{path.stem}.yaml"),
                                      "-o", str(tmp_path / "c")])
    assert built.exit_code == 0, built.output
    assert (tmp_path / "c" / "block_norm.c").is_file()


@pytest.mark.parametrize("content,suffix,words", [
    (b"not a model", ".onnx", "not an ONNX model"),
    (b"PK junk", ".pt2", "not a torch.export program"),
    (b"{}", ".pt", "export the model with torch.export"),
    (b"{}", ".json", "not a model gncodegen reads"),
])
def test_bad_models_fail_in_one_line_and_write_nothing(tmp_path, content, suffix, words):
    path = tmp_path / f"m{suffix}"
    path.write_bytes(content)
    out = tmp_path / "out"
    run = CliRunner().invoke(main, ["import", str(path), "-o", str(out)])
    assert run.exit_code != 0 and not out.exists()
    lines = run.output.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], run.output


def test_a_model_without_group_norm_says_why(tmp_path):
    # An InstanceNormalization on its own is an instance norm: reported, nothing written.
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 5])
    inits = [numpy_helper.from_array(np.ones(4, np.float32), "s"),
             numpy_helper.from_array(np.zeros(4, np.float32), "b")]
    graph = helper.make_graph([helper.make_node("InstanceNormalization", ["x", "s", "b"], ["y"])],
                              "g", [x], [helper.make_tensor_value_info("y", 1, None)], inits)
    path = tmp_path / "inst.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    (tmp_path / "inst.yaml").write_text("keep me\n")
    run = CliRunner().invoke(main, ["import", str(path), "-o", str(tmp_path)])
    assert run.exit_code != 0 and "nothing to import" in run.output
    assert "instance norm, not a group norm" in run.output
    assert (tmp_path / "inst.yaml").read_text() == "keep me\n"


def test_input_shape_option_is_checked(tmp_path):
    path = _hand_model(tmp_path, opset=21, per_group=False)
    for bad, words in (("x=2x0", "not a positive size"), ("x", "is not NAME=D0xD1x"),
                       ("y=1x8x5x6", "no input named 'y'")):
        run = CliRunner().invoke(main, ["import", str(path), "-o", str(tmp_path / "o"),
                                        "--input-shape", bad])
        assert run.exit_code != 0 and words in run.output, run.output


def test_layer_names_are_identifiers_and_unique():
    taken: set[str] = set()
    assert layer_name("/encoder/norm1/InstanceNormalization", taken,
                      "InstanceNormalization") == "encoder_norm1"
    assert layer_name("/encoder/norm1/InstanceNormalization", taken,
                      "InstanceNormalization") == "encoder_norm1_2"
    assert layer_name("123", taken) == "gn_123"
    assert layer_name("", taken) == "gn"
    assert layer_name("int", taken) != "int"          # a C keyword is no name
