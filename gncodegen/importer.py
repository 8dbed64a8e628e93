"""`gncodegen import`: the group normalizations of a trained model, as a spec that builds.

ONNX models are read with the `onnx` package: opset 18's GroupNormalization (scale and bias per
group, expanded to channels), opset 21's (per channel), ONNX Runtime's com.microsoft.GroupNorm
and SkipGroupNorm (channels last), and the pattern older exporters write for a group norm
(Reshape -> InstanceNormalization -> Reshape -> Mul -> Add). PyTorch exported programs
(`torch.export.save`, `.pt2`) are read with `torch.export.load`: aten.group_norm and
aten.native_group_norm. An activation that is the normalization's only consumer is fused.
Dimensions the graph leaves symbolic become runtime sizes; the batch (axis 0) is B.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import GncodegenError
from .names import name_problem

# ONNX element types gncodegen takes, by TensorProto number.
ONNX_DTYPES = {1: "single", 11: "double", 10: "half", 16: "bfloat16"}


class ImportFailed(GncodegenError):
    """A model could not be read, or held nothing to import."""


@dataclass
class Found:
    """One group normalization found in a graph, as spec keys and its parameters."""

    node: str                       # where it is in the graph
    op: str                         # the node's operator
    pattern: str                    # which form it had
    keys: dict[str, Any]            # the layer's spec keys (parameters apart)
    scale: np.ndarray
    offset: np.ndarray
    fused: list[str] = field(default_factory=list)   # the ops fused into it


@dataclass(frozen=True)
class Skipped:
    """A node that looked like a group normalization but was not imported, and why."""

    node: str
    op: str
    why: str


@dataclass
class ImportResult:
    """What an import wrote and found."""

    spec_path: Path
    params_path: Path
    found: list[Found]
    skipped: list[Skipped]
    names: list[str] = field(default_factory=list)   # the layer name each Found got


# --------------------------------------------------------------------------- shapes and names


def parse_input_shapes(values: tuple[str, ...]) -> dict[str, list[int | None]]:
    """Return NAME=D0xD1x... options as {name: dims}; a `?` or symbolic dim stays None."""
    out: dict[str, list[int | None]] = {}
    for text in values:
        name, eq, dims = text.partition("=")
        if not eq or not name or not dims:
            raise ImportFailed(f"--input-shape: '{text}' is not NAME=D0xD1x...")
        parsed: list[int | None] = []
        for d in dims.lower().split("x"):
            if d.isdigit() and int(d) > 0:
                parsed.append(int(d))
            elif d in ("?", "n", "~"):
                parsed.append(None)
            else:
                raise ImportFailed(f"--input-shape: '{d}' in '{text}' is not a positive size "
                                   "(or ? for one left to run time)")
        out[name] = parsed
    return out


def layer_name(raw: str, taken: set[str], op: str = "") -> str:
    """Return a layer name for a graph node's name: a C identifier in lower case, unique. An
    exporter's scope path names the module: `/encoder/norm1/InstanceNormalization` is
    `encoder_norm1`."""
    parts = [p for p in raw.split("/") if p]
    if len(parts) > 1 and op and re.sub(r"_\d+$", "", parts[-1]).lower() == op.lower():
        parts = parts[:-1]
    base = re.sub(r"[^0-9a-z_]+", "_", "_".join(parts).lower()).strip("_")
    base = re.sub(r"_+", "_", base)
    if not base or not base[0].isalpha():
        base = "gn_" + base if base else "gn"
    base = base[:48].rstrip("_")
    name, k = base, 1
    while name in taken or name_problem(name) is not None:
        k += 1
        name = f"{base}_{k}"
        if k > 1000:
            name = f"gn_{len(taken) + 1}"
            break
    taken.add(name)
    return name


def channels_first_keys(shape: list[int | None], groups: int) -> dict[str, Any]:
    """Return format, layout and input_size for an (N, C, ...) tensor (PyTorch and ONNX order):
    the batch on B, the rest as spatial sizes, None left to run time."""
    rest = shape[2:]
    fmt = "BC" + "S" * len(rest)
    sizes = [shape[1], *[None if d is None else d for d in rest]]
    return {"num_groups": groups, "format": fmt, "layout": "row-major", "input_size": sizes}


def channels_last_keys(shape: list[int | None], groups: int) -> dict[str, Any]:
    """The same for an (N, ..., C) tensor (ONNX Runtime's channels-last GroupNorm)."""
    rest = shape[1:-1]
    fmt = "B" + "S" * len(rest) + "C"
    sizes = [*[None if d is None else d for d in rest], shape[-1]]
    return {"num_groups": groups, "format": fmt, "layout": "row-major", "input_size": sizes}


# --------------------------------------------------------------------------- ONNX


class _OnnxGraph:
    """The parts of an ONNX graph the patterns look at."""

    def __init__(self, model, input_shapes: dict[str, list[int | None]]):
        import onnx
        from onnx import numpy_helper, shape_inference

        graph = model.graph
        for inp in graph.input:
            if inp.name in input_shapes:
                dims = input_shapes.pop(inp.name)
                tensor_type = inp.type.tensor_type
                tensor_type.shape.Clear()
                for d in dims:
                    dim = tensor_type.shape.dim.add()
                    if d is None:
                        dim.dim_param = "dynamic"
                    else:
                        dim.dim_value = d
        if input_shapes:
            raise ImportFailed(f"--input-shape: the model has no input named "
                               f"'{next(iter(input_shapes))}' (it has "
                               f"{', '.join(i.name for i in graph.input)})")
        try:
            model = shape_inference.infer_shapes(model, data_prop=True)
        except Exception:          # a model shape inference cannot follow is read as it is
            pass
        self.model = model
        graph = model.graph
        self.opset = {o.domain or "ai.onnx": o.version for o in model.opset_import}
        self.nodes = list(graph.node)
        self.constants: dict[str, np.ndarray] = {
            t.name: numpy_helper.to_array(t) for t in graph.initializer}
        for node in self.nodes:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                for attr in node.attribute:
                    if attr.name == "value":
                        self.constants[node.output[0]] = numpy_helper.to_array(attr.t)
        self.types: dict[str, Any] = {}
        for vi in [*graph.input, *graph.value_info, *graph.output]:
            self.types[vi.name] = vi.type.tensor_type
        self.consumers: dict[str, list] = {}
        for node in self.nodes:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.graph_outputs = {o.name for o in graph.output}
        self.onnx = onnx
        self.known: dict[str, list[int | None]] = {}
        self._propagate()

    # Shape inference stops at a Reshape to Shape(x), as PyTorch's older exporters write a
    # group norm; these ops keep their input's shape, so the next group norm's is known.
    UNARY = {"Relu", "Sigmoid", "Tanh", "LeakyRelu", "Elu", "Gelu", "Clip", "Identity",
             "Softplus", "HardSigmoid", "Erf"}
    BINARY = {"Mul", "Add", "Sub", "Div"}

    def _propagate(self) -> None:
        producer = {out: node for node in self.nodes for out in node.output}
        for node in self.nodes:
            if not node.output or self.shape(node.output[0]) is not None:
                continue
            shape = None
            if node.op_type == "Reshape" and len(node.input) == 2:
                src = producer.get(node.input[1])
                if src is not None and src.op_type == "Shape" and not src.attribute:
                    shape = self.shape(src.input[0])
            elif node.op_type in self.UNARY and node.input:
                shape = self.shape(node.input[0])
            elif node.op_type in self.BINARY and len(node.input) == 2:
                shapes = [self.shape(i) for i in node.input]
                consts = [self.const(i) for i in node.input]
                for k in (0, 1):
                    other = consts[1 - k]
                    if shapes[k] is not None and other is not None and \
                            other.ndim <= len(shapes[k]) and other.size <= max(
                                1, int(np.prod([d or 1 for d in shapes[k]]))):
                        shape = shapes[k]
                if shapes[0] is not None and shapes[0] == shapes[1]:
                    shape = shapes[0]
            if shape is not None:
                self.known[node.output[0]] = shape

    def shape(self, name: str) -> list[int | None] | None:
        if name in self.known:
            return self.known[name]
        tt = self.types.get(name)
        if tt is None or not tt.HasField("shape"):
            return None
        return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                for d in tt.shape.dim]

    def dtype(self, name: str) -> str | None:
        tt = self.types.get(name)
        return ONNX_DTYPES.get(tt.elem_type) if tt is not None else None

    def attr(self, node, name: str, default=None):
        for a in node.attribute:
            if a.name == name:
                return self.onnx.helper.get_attribute_value(a)
        return default

    def only_consumer(self, name: str):
        users = self.consumers.get(name, [])
        if len(users) == 1 and name not in self.graph_outputs:
            return users[0]
        return None

    def const(self, name: str) -> np.ndarray | None:
        return self.constants.get(name)


def _onnx_activation(g: _OnnxGraph, out: str) -> tuple[Any, str, list[str]]:
    """Return (activation spec value or None, the tensor the layer's output becomes, the ops
    fused) for an activation that is the only consumer of `out`."""
    users = g.consumers.get(out, [])
    # swish written as x * Sigmoid(x): out's consumers are exactly a Sigmoid and a Mul of both
    if len(users) == 2 and out not in g.graph_outputs:
        sig = next((u for u in users if u.op_type == "Sigmoid"), None)
        mul = next((u for u in users if u.op_type == "Mul"), None)
        if sig is not None and mul is not None and set(mul.input) == {out, sig.output[0]} \
                and g.only_consumer(sig.output[0]) is mul:
            return "swish", mul.output[0], ["Sigmoid", "Mul"]
    node = g.only_consumer(out)
    if node is None or node.domain not in ("", "ai.onnx"):
        return None, out, []
    op = node.op_type
    simple = {"Relu": "relu", "Sigmoid": "sigmoid", "Tanh": "tanh"}
    if op in simple:
        return simple[op], node.output[0], [op]
    if op == "LeakyRelu":
        return {"type": "leaky-relu", "scale": float(g.attr(node, "alpha", 0.01))}, \
            node.output[0], [op]
    if op == "Elu":
        return {"type": "elu", "alpha": float(g.attr(node, "alpha", 1.0))}, node.output[0], [op]
    if op == "Gelu":
        approx = g.attr(node, "approximate", b"none")
        approx = approx.decode() if isinstance(approx, bytes) else str(approx)
        return {"type": "gelu", "approximation": approx}, node.output[0], [op]
    if op == "Clip" and len(node.input) >= 3:
        lo, hi = g.const(node.input[1]), g.const(node.input[2])
        if lo is not None and hi is not None and float(lo) == 0.0 and float(hi) > 0:
            return {"type": "clipped-relu", "ceiling": float(hi)}, node.output[0], [op]
    return None, out, []


def _onnx_group_norms(g: _OnnxGraph) -> tuple[list[Found], list[Skipped]]:
    found: list[Found] = []
    skipped: list[Skipped] = []
    for k, node in enumerate(g.nodes):
        label = _scope_name(node) or node.name or f"{node.op_type}_{k}"
        try:
            item = _onnx_node(g, node, label)
        except _Skip as why:
            skipped.append(Skipped(label, node.op_type, str(why)))
            continue
        if item is not None:
            found.append(item)
    return found, skipped


def _scope_name(node) -> str:
    """Return the module path PyTorch's dynamo exporter records for a node (`encoder/norm1`),
    or "" where it recorded none."""
    import ast

    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = [str(p) for p in ast.literal_eval(prop.value) if p]
            except (ValueError, SyntaxError):
                return ""
            return "/".join(scopes[:-1] if len(scopes) > 1 else scopes)
    return ""


class _Skip(Exception):
    """Why a candidate node is not imported."""


def _need_shape(g: _OnnxGraph, name: str, rank_min: int = 2) -> list[int | None]:
    shape = g.shape(name)
    if shape is None or len(shape) < rank_min:
        raise _Skip(f"the shape of its input '{name}' is unknown "
                    "(give it with --input-shape NAME=D0xD1x...)")
    return shape


def _finish(g: _OnnxGraph, label: str, op: str, pattern: str, keys: dict, scale, offset,
            eps: float, x: str, out: str, fused: list[str], own_activation=None) -> Found:
    dtype = g.dtype(x)
    if dtype is None:
        raise _Skip(f"its input '{x}' is not a float, double, float16 or bfloat16 tensor")
    if own_activation is not None:
        # The node applies its own activation: one after it is not fused (a layer has one).
        activation, act_ops = own_activation
    else:
        activation, _, act_ops = _onnx_activation(g, out)
    # ONNX keeps epsilon as a float: its shortest float text (1e-05, not 9.9999997e-06)
    keys = dict(keys, epsilon=float(str(np.float32(eps))), dtype=dtype)
    if activation is not None:
        keys["activation"] = activation
    return Found(label, op, pattern, keys, np.asarray(scale, np.float64).reshape(-1),
                 np.asarray(offset, np.float64).reshape(-1), fused + act_ops)


def _onnx_node(g: _OnnxGraph, node, label: str) -> Found | None:
    op, domain = node.op_type, node.domain or "ai.onnx"
    if op == "GroupNormalization" and domain == "ai.onnx":
        x = node.input[0]
        shape = _need_shape(g, x)
        groups = int(g.attr(node, "num_groups"))
        scale, bias = g.const(node.input[1]), g.const(node.input[2])
        if scale is None or bias is None:
            raise _Skip("its scale or bias is computed in the graph, not a constant")
        c = shape[1]
        if c is None:
            raise _Skip("its channel count is not fixed in the graph")
        opset = g.opset.get("ai.onnx", 0)
        if scale.size == groups and c != groups and opset < 21:
            # opset 18: one value per group, each applied to the group's channels
            scale, bias = np.repeat(scale, c // groups), np.repeat(bias, c // groups)
            pattern = f"GroupNormalization (opset {opset}: per group, expanded)"
        elif scale.size == c:
            pattern = f"GroupNormalization (opset {opset})"
        else:
            raise _Skip(f"its scale has {scale.size} values for {c} channels in {groups} groups")
        return _finish(g, label, op, pattern, channels_first_keys(shape, groups), scale, bias,
                       g.attr(node, "epsilon", 1e-5), x, node.output[0], [])
    if op in ("GroupNorm", "SkipGroupNorm") and domain == "com.microsoft":
        x = node.input[0]
        shape = _need_shape(g, x, 3)
        groups = int(g.attr(node, "groups"))
        last = int(g.attr(node, "channels_last", 1))
        gamma, beta = g.const(node.input[1]), g.const(node.input[2])
        if gamma is None or beta is None:
            raise _Skip("its gamma or beta is computed in the graph, not a constant")
        keys = (channels_last_keys if last else channels_first_keys)(shape, groups)
        fused = []
        out = node.output[0]
        if op == "SkipGroupNorm":
            if len(node.input) > 4 and node.input[4]:
                raise _Skip("its bias input (added with the skip) has no place in the layer")
            skip_shape = g.shape(node.input[3])
            if skip_shape is None or len(skip_shape) != len(shape) or any(
                    a is not None and b is not None and a != b
                    for a, b in zip(skip_shape, shape)) or (
                    None in skip_shape[1:] and skip_shape[1:] != shape[1:]):
                raise _Skip(f"its skip {skip_shape} is not shaped like its input {shape} (a "
                            "skip broadcast over positions has no place in the layer)")
            keys["skip"] = True
            fused.append("skip add")
        own = ("swish", ["activation=1 (swish)"]) if int(g.attr(node, "activation", 0)) == 1 \
            else None
        return _finish(g, label, op, f"com.microsoft.{op}", keys, gamma, beta,
                       g.attr(node, "epsilon", 1e-5), x, out, fused, own)
    if op == "InstanceNormalization" and domain == "ai.onnx":
        return _onnx_instance_pattern(g, node, label)
    return None


def _onnx_instance_pattern(g: _OnnxGraph, node, label: str) -> Found:
    """Reshape(x, [N, G, -1]) -> InstanceNormalization -> Reshape(back) -> Mul(w) -> Add(b)."""
    pre = next((n for n in g.nodes if node.input[0] in n.output), None)
    if pre is None or pre.op_type != "Reshape":
        raise _Skip("an InstanceNormalization not fed by a Reshape to (N, groups, -1) is an "
                    "instance norm, not a group norm")
    x = pre.input[0]
    target = g.const(pre.input[1])
    shape = _need_shape(g, x, 3)
    if target is None or target.size != 3:
        raise _Skip("its Reshape's target shape is not a constant (N, groups, -1)")
    groups = int(target[1])
    inst_scale, inst_bias = g.const(node.input[1]), g.const(node.input[2])
    if inst_scale is None or inst_bias is None or not (
            np.all(inst_scale == 1) and np.all(inst_bias == 0)):
        raise _Skip("its InstanceNormalization has a scale or bias of its own")
    post = g.only_consumer(node.output[0])
    mul = g.only_consumer(post.output[0]) if post is not None and post.op_type == "Reshape" \
        else None
    add = g.only_consumer(mul.output[0]) if mul is not None and mul.op_type == "Mul" else None
    if add is None or add.op_type != "Add":
        raise _Skip("its Reshape -> InstanceNormalization -> Reshape is not followed by Mul and "
                    "Add of per-channel constants")
    c = shape[1]
    weight = next((g.const(i) for i in mul.input if g.const(i) is not None), None)
    bias = next((g.const(i) for i in add.input if g.const(i) is not None), None)
    if c is None or weight is None or bias is None or weight.size != c or bias.size != c:
        raise _Skip("its Mul and Add are not by one constant per channel")
    return _finish(g, label, "InstanceNormalization",
                   "Reshape, InstanceNormalization, Reshape, Mul, Add",
                   channels_first_keys(shape, groups), weight, bias,
                   g.attr(node, "epsilon", 1e-5), x, add.output[0],
                   ["Reshape", "Reshape", "Mul", "Add"])


def read_onnx(path: Path, input_shapes: dict) -> tuple[list[Found], list[Skipped]]:
    try:
        import onnx
    except ImportError:
        raise ImportFailed("reading ONNX needs the onnx package: pip install 'gncodegen[import]'")
    try:
        model = onnx.load(str(path))
    except Exception as err:      # a truncated or foreign file: onnx raises many kinds
        raise ImportFailed(f"{path}: not an ONNX model ({type(err).__name__})") from None
    return _onnx_group_norms(_OnnxGraph(model, dict(input_shapes)))


# --------------------------------------------------------------------------- PyTorch


def read_exported_program(path: Path, input_shapes: dict) -> tuple[list[Found], list[Skipped]]:
    """Return the group norms of a torch.export program (.pt2)."""
    try:
        import torch
    except ImportError:
        raise ImportFailed("reading .pt2 needs PyTorch (torch.export)") from None
    import logging
    quiet = [logging.getLogger(n) for n in ("torch.export", "torch._export")]
    levels = [lg.level for lg in quiet]
    for lg in quiet:
        lg.setLevel(logging.CRITICAL)     # its own traceback of a foreign file is no news
    try:
        ep = torch.export.load(str(path))
    except Exception as err:
        raise ImportFailed(f"{path}: not a torch.export program ({type(err).__name__})") from None
    finally:
        for lg, level in zip(quiet, levels):
            lg.setLevel(level)
    if input_shapes:
        raise ImportFailed("--input-shape: an exported program carries its own shapes "
                           "(export with dynamic_shapes to leave sizes to run time)")
    sig = ep.graph_signature
    params = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
    state = ep.state_dict
    constants = getattr(ep, "constants", {})

    def tensor_of(node) -> np.ndarray | None:
        if node is None:
            return None
        key = params.get(node.name) or getattr(sig, "inputs_to_lifted_tensor_constants",
                                                {}).get(node.name)
        value = state.get(key) if key in state else constants.get(key)
        return None if value is None else value.detach().to(torch.float64).numpy()

    aten = torch.ops.aten
    acts = {aten.relu.default: "relu", aten.sigmoid.default: "sigmoid",
            aten.tanh.default: "tanh", aten.silu.default: "swish"}
    found: list[Found] = []
    skipped: list[Skipped] = []
    for node in ep.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target == aten.group_norm.default:
            x, groups, weight, bias = node.args[:4]
            eps = node.args[4] if len(node.args) > 4 else node.kwargs.get("eps", 1e-5)
            out = node
        elif node.target == aten.native_group_norm.default:
            x, weight, bias, _, _, _, groups, eps = node.args[:8]
            outs = [u for u in node.users if u.target.__name__ == "getitem" and u.args[1] == 0]
            if len(outs) != 1:
                skipped.append(Skipped(node.name, "native_group_norm", "its output is not used"))
                continue
            out = outs[0]
        else:
            continue
        val = x.meta.get("val")
        if val is None:
            skipped.append(Skipped(node.name, str(node.target), "its input has no shape"))
            continue
        shape = [int(d) if isinstance(d, int) else None for d in val.shape]
        shape[0] = None
        scale = tensor_of(weight) if weight is not None else np.ones(shape[1])
        offset = tensor_of(bias) if bias is not None else np.zeros(shape[1])
        if scale is None or offset is None:
            skipped.append(Skipped(node.name, str(node.target),
                                   "its weight or bias is computed, not a parameter"))
            continue
        dtype = {torch.float32: "single", torch.float64: "double", torch.float16: "half",
                 torch.bfloat16: "bfloat16"}.get(val.dtype)
        keys = dict(channels_first_keys(shape, int(groups)), epsilon=float(eps), dtype=dtype)
        fused: list[str] = []
        users = list(out.users)
        if len(users) == 1 and users[0].op == "call_function":
            user = users[0]
            if user.target in acts:
                keys["activation"] = acts[user.target]
                fused.append(str(user.target.__name__))
            elif user.target == aten.leaky_relu.default:
                slope = user.args[1] if len(user.args) > 1 else 0.01
                keys["activation"] = {"type": "leaky-relu", "scale": float(slope)}
                fused.append("leaky_relu")
            elif user.target == aten.gelu.default:
                approx = user.kwargs.get("approximate", "none")
                keys["activation"] = {"type": "gelu", "approximation": approx}
                fused.append("gelu")
        # the module the call came from names it: `encoder.norm1` for model.encoder.norm1
        stack = node.meta.get("nn_module_stack") or {}
        where = list(stack.values())[-1][0] if stack else node.name
        found.append(Found(where.replace(".", "/") or node.name, "group_norm",
                           str(node.target.__name__), keys, scale.reshape(-1),
                           offset.reshape(-1), fused))
    return found, skipped


# --------------------------------------------------------------------------- writing


def spec_document(found: list[Found], params_file: str, names: list[str]) -> dict:
    """Return the spec as YAML data: one layer per Found, its parameters in params_file."""
    layers = []
    for name, item in zip(names, found):
        keys = {"name": name, **item.keys}
        keys["input_size"] = list(keys["input_size"])     # None: left to run time (~)
        keys["scale"] = {"file": params_file, "key": f"{name}_scale"}
        keys["offset"] = {"file": params_file, "key": f"{name}_offset"}
        layers.append(keys)
    return {"layers": layers}


def import_model(model: str | os.PathLike, out_dir: str | os.PathLike | None = None,
                 input_shapes: tuple[str, ...] = ()) -> ImportResult:
    """Read a model, write DIR/<stem>.yaml and DIR/<stem>.npz, and return what was found.

    Nothing is written unless something was found and every file could be made: the spec and
    parameters are written beside the target folder first and moved into place together."""
    path = Path(model)
    if not path.is_file():
        raise ImportFailed(f"{path}: no such file")
    shapes = parse_input_shapes(tuple(input_shapes))
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        found, skipped = read_onnx(path, shapes)
    elif suffix == ".pt2":
        found, skipped = read_exported_program(path, shapes)
    elif suffix in (".pt", ".pth"):
        raise ImportFailed(f"{path}: a {suffix} file holds weights or TorchScript, not a graph; "
                           "export the model with torch.export.export and torch.export.save "
                           "to a .pt2 file")
    else:
        raise ImportFailed(f"{path}: not a model gncodegen reads (.onnx, or .pt2 from "
                           "torch.export.save)")
    if not found:
        why = "; ".join(f"{s.node}: {s.why}" for s in skipped) or "no group normalization"
        raise ImportFailed(f"{path}: nothing to import ({why})")
    folder = Path(out_dir) if out_dir is not None else Path.cwd()
    stem = re.sub(r"[^0-9A-Za-z_.-]+", "_", path.stem) or "model"
    taken: set[str] = set()
    names = [layer_name(item.node, taken, item.op) for item in found]
    spec_path, params_path = folder / f"{stem}.yaml", folder / f"{stem}.npz"
    document = spec_document(found, params_path.name, names)
    arrays = {}
    for name, item in zip(names, found):
        arrays[f"{name}_scale"] = item.scale
        arrays[f"{name}_offset"] = item.offset
    _check_spec(document, arrays, folder)
    folder.mkdir(parents=True, exist_ok=True)
    _write_together(folder, {spec_path.name: _yaml_text(document, path),
                             params_path.name: _npz_bytes(arrays)})
    return ImportResult(spec_path, params_path, found, skipped, names)


def _yaml_text(document: dict, source: Path) -> bytes:
    import yaml

    head = (f"# Imported by gncodegen from {source.name}: one layer per group normalization "
            "found.\n# Build it with: gncodegen build <this file>\n")
    return (head + yaml.safe_dump(document, sort_keys=False, default_flow_style=None)).encode()


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    import io

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _check_spec(document: dict, arrays: dict, folder: Path) -> None:
    """Validate the spec about to be written exactly as `gncodegen build` will read it."""
    import yaml

    from .pipeline import parse_spec

    with tempfile.TemporaryDirectory(prefix="gn-import-") as tmp:
        Path(tmp, "params.npz").write_bytes(_npz_bytes(arrays))
        doc = {"layers": [dict(layer, scale=dict(layer["scale"], file="params.npz"),
                               offset=dict(layer["offset"], file="params.npz"))
                          for layer in document["layers"]]}
        parse_spec(yaml.safe_dump(doc, sort_keys=False), Path(tmp), "imported")


def _write_together(folder: Path, files: dict[str, bytes]) -> None:
    """Write each file beside its place, then move them all in (no half-written output)."""
    staged = []
    try:
        for name, data in files.items():
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=folder)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            staged.append((tmp, folder / name))
        for tmp, final in staged:
            os.replace(tmp, final)
    finally:
        for tmp, _ in staged:
            if os.path.exists(tmp):
                os.unlink(tmp)


def table(result: ImportResult) -> str:
    """Return the printed summary: what was imported (with what fused) and what was not."""
    rows = [("layer", "from", "format", "input_size", "groups", "fused")]
    for item, layer in zip(result.found, result.names):
        k = item.keys
        size = "[" + ", ".join("~" if d is None else str(d) for d in k["input_size"]) + "]"
        rows.append((layer, f"{item.node} ({item.pattern})", k["format"], size,
                     str(k["num_groups"]), ", ".join(item.fused) or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    if result.skipped:
        lines.append("not imported:")
        lines += [f"  {s.node} ({s.op}): {s.why}" for s in result.skipped]
    lines.append(f"wrote {result.spec_path} and {result.params_path.name}")
    return "\n".join(lines)

