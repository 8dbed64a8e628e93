"""Layer specs: YAML in, validated frozen objects out.

All validation lives here and in the modules it calls (yamlspec reads the YAML, names checks
layer names, params reads the learned parameters, fields parses single values). Every error is
a SpecError whose message names the field (as the user spelled it, prefixed by ``layers[i].``
in multi-layer files) and the rule broken.
"""

from __future__ import annotations

import difflib
import hashlib
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .activations import NONE, Activation, parse_activation
from .errors import SpecError
from .fields import parse_choice, parse_int, parse_number, parse_switch
from .files import read_regular
from .names import parse_name
from .options import SpecOption
from .params import check_representable, initialize, load_param, parse_initializer
from .text import comment_problem, preview
from .yamlspec import load_yaml

# Files the targets write per layer besides <name>.h/.c: another layer named <name><suffix>
# would write over them.
GENERATED_SUFFIXES = (("_cuda", "CUDA header"), ("_harness", "test harness"))
# A spec is a few kilobytes; past this it is not one (and /dev/zero never ends).
MAX_SPEC_BYTES = 16 << 20

DTYPES = {"single": "single", "float32": "single", "float": "single",
          "double": "double", "float64": "double",
          "half": "half", "float16": "half", "bfloat16": "bfloat16"}
LAYOUTS = ("column-major", "row-major")
GROUP_WORDS = {"all-channels": "all-channels", "allchannels": "all-channels",
               "channel-wise": "channel-wise", "channelwise": "channel-wise"}
FORMAT_LETTERS = set("SCBTU")
MAX_DIMS = 8
MAX_SIZE = 2**31 - 1
# The bytes of one observation, and of every offset into a batch of them, must fit a 64-bit
# size_t: 2^60 elements of 8 bytes leaves room for the batch. Any such size renders (sizes are
# compile-time constants); whether a size can be verified on this machine is decided by the
# verification, from the memory it needs.
MAX_OBSERVATION_BYTES = 2**63
MAX_ELEMENT_BYTES = 8
# Every channel's scale and offset are compiled into the sources as literals: 2^20 channels
# make about 20 MB of initializers per target and a few seconds to render; more is no layer
# anyone trains, and would take minutes and gigabytes to build.
MAX_CHANNELS = 2**20

# canonical key -> accepted aliases (MATLAB property names)
KEYS: dict[str, tuple[str, ...]] = {
    "name": ("Name",),
    "num_groups": ("NumGroups",),
    "num_channels": ("NumChannels",),
    "format": ("Format",),
    "layout": ("Layout",),
    "input_size": ("InputSize",),
    "epsilon": ("Epsilon",),
    "dtype": ("DataType",),
    "scale": ("Scale",),
    "offset": ("Offset",),
    "scale_initializer": ("ScaleInitializer",),
    "offset_initializer": ("OffsetInitializer",),
    "seed": ("Seed",),
    "scale_learn_rate_factor": ("ScaleLearnRateFactor",),
    "offset_learn_rate_factor": ("OffsetLearnRateFactor",),
    "scale_l2_factor": ("ScaleL2Factor",),
    "offset_l2_factor": ("OffsetL2Factor",),
    "activation": ("Activation",),
    "skip": ("Skip",),
    "adaptive": ("Adaptive",),
    "training": ("Training",),
}
ALIASES = {alias: key for key, aliases in KEYS.items() for alias in (key, *aliases)}
REQUIRED = ("num_groups", "format", "input_size")


@dataclass(frozen=True)
class RuntimeSize:
    """An input_size entry left to run time: any size (max None) or any up to max. It becomes
    a size_t argument of every entry point, named by its label and rank (s1, s2, s3, t, u1)."""

    name: str
    max: int | None = None

    def __str__(self) -> str:
        return "~" if self.max is None else f"<={self.max}"


def runtime_size_names(fmt: str) -> list[str]:
    """Return the argument name of each non-B label of a format, in order: S and U by rank
    (s1, s2, u1), T and C by letter."""
    counts: dict[str, int] = {}
    names = []
    for ch in fmt:
        if ch == "B":
            continue
        counts[ch] = counts.get(ch, 0) + 1
        names.append(f"{ch.lower()}{counts[ch]}" if ch in "SU" else ch.lower())
    return names


@dataclass(frozen=True)
class Layer:
    """One validated group normalization layer; every value resolved and checked."""

    name: str
    num_groups: int
    num_channels: int
    format: str
    layout: str
    input_size: tuple[int | RuntimeSize, ...]   # RuntimeSize: left to run time (not C)
    epsilon: float
    dtype: str
    scale: tuple[float, ...]
    offset: tuple[float, ...]
    scale_source: str
    offset_source: str
    scale_learn_rate_factor: float = 1.0
    offset_learn_rate_factor: float = 1.0
    scale_l2_factor: float = 1.0
    offset_l2_factor: float = 1.0
    options: tuple[tuple[str, Any], ...] = ()    # the targets' own keys (gncodegen.options)
    activation: Activation = NONE                # applied to the normalized, scaled output
    skip: bool = False          # normalizes x + skip (an extra input), optionally written to `sum`
    adaptive: bool = False      # modulated per observation and channel by ada_scale, ada_shift
    training: bool = False      # adds forward_train, backward and the solvers' updates
    num_groups_given: str = ""
    field_prefix: str = ""

    def option(self, key: str, default: Any = None) -> Any:
        """Return the value of a target's spec option, or default where the layer has none."""
        return dict(self.options).get(key, default)

    @property
    def has_batch(self) -> bool:
        """True when the format carries an observation (B) dimension."""
        return "B" in self.format

    @property
    def channels_per_group(self) -> int:
        """Channels in each group."""
        return self.num_channels // self.num_groups

    @property
    def fusion_args(self) -> tuple[str, ...]:
        """The fusion arguments every entry point takes after scale and offset, in order:
        skip and sum (skip), ada_scale and ada_shift (adaptive)."""
        return (("skip", "sum") if self.skip else ()) + (
            ("ada_scale", "ada_shift") if self.adaptive else ())

    @property
    def fused(self) -> bool:
        """True when anything is fused around the normalization (activation, skip, adaptive)."""
        return self.activation.fused or self.skip or self.adaptive

    def fusion_text(self) -> str:
        """What is fused around the normalization, in words ("" for a plain layer)."""
        parts = (["x + skip normalized (written to sum unless it is NULL)"] if self.skip else [])
        if self.adaptive:
            parts.append("z*(1 + ada_scale) + ada_shift per observation and channel")
        if self.activation.fused:
            parts.append(f"then {self.activation.describe()}")
        return "; ".join(parts) + (", fused" if parts else "")

    @property
    def runtime_sizes(self) -> tuple[RuntimeSize, ...]:
        """The input_size entries left to run time, in format order."""
        return tuple(v for v in self.input_size if isinstance(v, RuntimeSize))

    @property
    def observation_numel(self) -> int:
        """Elements in one observation (all non-B dimensions); a layer with runtime sizes has
        none until at_sizes fixes them."""
        if self.runtime_sizes:
            raise TypeError(f"layer '{self.name}' has runtime sizes: no fixed element count")
        return math.prod(self.input_size)

    @property
    def fixed_numel(self) -> int:
        """The product of the fixed input_size entries (the runtime ones count 1)."""
        return math.prod(v for v in self.input_size if isinstance(v, int))

    def at_sizes(self, sizes: Sequence[int]) -> "Layer":
        """Return the layer with its runtime sizes fixed to sizes (format order)."""
        given = iter(sizes)
        fixed = tuple(next(given) if isinstance(v, RuntimeSize) else v for v in self.input_size)
        assert next(given, None) is None, sizes
        return replace(self, input_size=fixed)

    def dims(self) -> tuple[tuple[str, int | RuntimeSize | None], ...]:
        """(label, size) for every format letter in order; B's size is None (runtime)."""
        sizes = iter(self.input_size)
        return tuple((ch, None if ch == "B" else next(sizes)) for ch in self.format)


@dataclass(frozen=True)
class Spec:
    """A spec file: its layers, where it came from and a hash of its bytes."""

    path: str
    stem: str
    sha256: str
    layers: tuple[Layer, ...] = field(default_factory=tuple)




def load_spec(path: str | Path, allow_code: bool = False,
              options: Sequence[SpecOption] = ()) -> Spec:
    """Return the validated Spec read from a YAML file (a regular file of text).

    options: the targets' own spec keys to accept (gncodegen.targets.spec_options()).
    """
    shown = os.fspath(path)
    if not shown:
        raise SpecError("spec", "the file name is empty")
    p = Path(shown)
    problem = comment_problem(p.name)
    if problem:
        # The file's name is printed in generated comments (C, CMake): a newline there
        # would start a line of code, a bidirectional override would hide some.
        raise SpecError("spec", f"the file name {problem}; rename the file")
    raw = read_regular(p, "spec", shown, MAX_SPEC_BYTES)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise SpecError("spec", "file is not UTF-8 text") from None
    return parse_spec(text, base_dir=p.resolve().parent, stem=p.stem, path=shown,
                      allow_code=allow_code, sha256=hashlib.sha256(raw).hexdigest(),
                      options=options)


def parse_spec(text: str, base_dir: Path, stem: str, path: str = "<string>",
               allow_code: bool = False, sha256: str | None = None,
               options: Sequence[SpecOption] = ()) -> Spec:
    """Return the validated Spec for YAML text whose relative paths resolve in base_dir."""
    doc = load_yaml(text)
    return spec_of(doc, base_dir, stem, path, allow_code,
                   sha256 or hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest(),
                   options)


def spec_of(doc: Any, base_dir: Path, stem: str, path: str, allow_code: bool, sha256: str,
            options: Sequence[SpecOption] = ()) -> Spec:
    """Return the validated Spec of a loaded document (a mapping, as YAML or Python gives it)."""
    if not isinstance(doc, dict):
        kind = "empty" if doc is None else type(doc).__name__
        raise SpecError("spec", f"must be a mapping of layer properties, got {kind}")
    if "layers" in doc:
        extra = sorted(preview(k) for k in doc if k != "layers")
        if extra:
            raise SpecError(extra[0], "not allowed beside 'layers' (put it inside each layer)")
        items = doc["layers"]
        if not isinstance(items, list) or not items:
            raise SpecError("layers", "must be a non-empty list of layer mappings")
        layers = []
        for i, item in enumerate(items):
            prefix = f"layers[{i}]."
            if not isinstance(item, dict):
                raise SpecError(f"layers[{i}]", "must be a mapping of layer properties")
            layers.append(_parse_layer(item, prefix, f"{stem}_{i}", base_dir, allow_code,
                                       options))
        _check_layer_names([layer.name for layer in layers])
    else:
        layers = [_parse_layer(doc, "", stem, base_dir, allow_code, options)]
    return Spec(path=path, stem=stem, sha256=sha256, layers=tuple(layers))


def _check_layer_names(names: list[str]) -> None:
    """Raise when two layers of one file would write or define the same thing."""
    for i, n in enumerate(names):
        if n in names[:i]:
            raise SpecError(f"layers[{i}].name", f"'{n}' is used by an earlier layer")
        for j, m in enumerate(names[:i]):
            if n.upper() == m.upper():
                raise SpecError(f"layers[{i}].name",
                                f"'{n}' and layers[{j}] '{m}' give the same macro prefix")
            for a, b in ((n, m), (m, n)):
                for suffix, what in GENERATED_SUFFIXES:
                    if a.lower() == f"{b}{suffix}".lower():
                        raise SpecError(f"layers[{i}].name",
                                        f"'{n}' and layers[{j}] '{m}': {a}.h would clash "
                                        f"with {b}'s {what} ({b}{suffix}.*)")


def _canonical_keys(doc: dict, prefix: str, aliases: dict[str, str]
                    ) -> dict[str, tuple[str, Any]]:
    """Map canonical key -> (key as written, value), rejecting unknown and repeated keys."""
    out: dict[str, tuple[str, Any]] = {}
    for key, value in doc.items():
        if not isinstance(key, str):
            raise SpecError(f"{prefix}{preview(key)}", "keys must be strings")
        canon = aliases.get(key)
        if canon is None:
            close = (difflib.get_close_matches(key, list(aliases), n=1, cutoff=0.6)
                     if len(key) <= 64 else [])
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise SpecError(f"{prefix}{preview(key)}", f"unknown key{hint}")
        if canon in out:
            raise SpecError(f"{prefix}{key}", f"same property as '{out[canon][0]}', given twice")
        out[canon] = (key, value)
    return out


def _parse_layer(doc: dict, prefix: str, default_name: str, base_dir: Path,
                 allow_code: bool, options: Sequence[SpecOption]) -> Layer:
    aliases = {**ALIASES, **{a: o.key for o in options for a in (o.key, *o.aliases)}}
    keys = _canonical_keys(doc, prefix, aliases)
    for req in REQUIRED:
        if req not in keys:
            raise SpecError(f"{prefix}{req}", "required key is missing")

    def fname(key: str) -> str:
        return prefix + (keys[key][0] if key in keys else key)

    def get(key: str, default: Any = None) -> Any:
        return keys[key][1] if key in keys else default

    name = parse_name(get("name", default_name), fname("name"), given="name" in keys)
    fmt = _parse_format(get("format"), fname("format"))
    layout = parse_choice(get("layout", "column-major"), fname("layout"), {v: v for v in LAYOUTS})
    input_size = _parse_input_size(get("input_size"), fname("input_size"), fmt)
    channels_in = input_size[[ch for ch in fmt if ch != "B"].index("C")]
    num_channels = _parse_num_channels(get("num_channels", "auto"), fname("num_channels"),
                                       channels_in)
    num_groups, groups_given = _parse_num_groups(get("num_groups"), fname("num_groups"),
                                                 num_channels)
    epsilon = parse_number(get("epsilon", 1e-5), fname("epsilon"), positive=True)
    dtype = parse_choice(get("dtype", "single"), fname("dtype"), DTYPES)
    _check_epsilon_range(epsilon, fname("epsilon"), dtype)
    seed = parse_int(get("seed", 0), fname("seed"), minimum=0, maximum=2**63 - 1)
    factors = {k: parse_number(get(k, 1.0), fname(k), positive=False)
               for k in ("scale_learn_rate_factor", "offset_learn_rate_factor",
                         "scale_l2_factor", "offset_l2_factor")}
    own = tuple((o.key, o.parse(get(o.key, o.default), fname(o.key))) for o in options)
    activation = parse_activation(get("activation"), fname("activation"))
    skip = parse_switch(get("skip", False), fname("skip"))
    adaptive = parse_switch(get("adaptive", False), fname("adaptive"))
    training = parse_switch(get("training", False), fname("training"))

    params = {}
    for which, default_init, stream in (("scale", "ones", 0), ("offset", "zeros", 1)):
        init_key = f"{which}_initializer"
        init = parse_initializer(get(init_key, default_init), fname(init_key))
        if which in keys and keys[which][1] is not None:
            values, source = load_param(keys[which][1], fname(which), base_dir, num_channels)
        else:
            values, source = initialize(init, fname(init_key), num_channels, seed, stream,
                                        allow_code)
        check_representable(values, fname(which), dtype)
        params[which] = (values, source)

    return Layer(
        name=name, num_groups=num_groups, num_channels=num_channels, format=fmt, layout=layout,
        input_size=input_size, epsilon=epsilon, dtype=dtype,
        scale=params["scale"][0], offset=params["offset"][0],
        scale_source=params["scale"][1], offset_source=params["offset"][1],
        options=own, num_groups_given=groups_given, activation=activation,
        skip=skip, adaptive=adaptive, training=training, field_prefix=prefix, **factors,
    )


def _parse_format(value: Any, fld: str) -> str:
    if not isinstance(value, str) or not value:
        raise SpecError(fld, f"must be a string of dimension labels S C B T U, got "
                             f"{preview(value)}")
    bad = sorted(set(value) - FORMAT_LETTERS)
    if bad:
        raise SpecError(fld, f"'{preview(value)}' has label '{preview(bad[0])}'; "
                             "labels are S, C, B, T and U (upper case)")
    if len(value) > MAX_DIMS:
        raise SpecError(fld, f"at most {MAX_DIMS} labels")
    if value.count("C") != 1:
        raise SpecError(fld, f"'{value}' must have exactly one C label")
    if value.count("S") > 3:
        raise SpecError(fld, f"'{value}' has more than 3 S labels")
    for label in "BT":
        if value.count(label) > 1:
            raise SpecError(fld, f"'{value}' has more than one {label} label")
    return value


def _parse_size(value: Any, fld: str, label: str, name: str) -> int | RuntimeSize:
    """Return one input_size entry: a size, or a RuntimeSize for null or {max: N}."""
    if value is None or isinstance(value, dict):
        if label == "C":
            raise SpecError(fld, "the channel count must be fixed (every channel's scale and "
                                 "offset are compiled in); only S, T and U sizes may be left "
                                 "to run time")
        if value is None:
            return RuntimeSize(name)
        unknown = sorted(str(k) for k in value if k != "max")
        if unknown or "max" not in value:
            raise SpecError(fld, f"a runtime size is null (any size) or {{max: N}} (any size up "
                                 f"to N), got {preview(value)}")
        return RuntimeSize(name, parse_int(value["max"], f"{fld}.max", 1, MAX_SIZE))
    return parse_int(value, fld, 1, MAX_SIZE)


def _parse_input_size(value: Any, fld: str, fmt: str) -> tuple[int | RuntimeSize, ...]:
    labels = [ch for ch in fmt if ch != "B"]
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list):
        raise SpecError(fld, f"must be a list of {len(labels)} sizes (one per non-B label of "
                             f"'{fmt}'), got {preview(value)}")
    if len(value) != len(labels):
        raise SpecError(fld, f"has {len(value)} sizes but format '{fmt}' has {len(labels)} "
                             f"non-B labels ({''.join(labels)})")
    names = runtime_size_names(fmt)
    sizes = tuple(_parse_size(v, f"{fld}[{i}]", labels[i], names[i])
                  for i, v in enumerate(value))
    # The largest observation: runtime sizes at their bound (an unbounded one is checked at
    # run time, where the entry points refuse a product that overflows size_t).
    largest = math.prod(v if isinstance(v, int) else (v.max or 1) for v in sizes)
    if largest * MAX_ELEMENT_BYTES >= MAX_OBSERVATION_BYTES:
        raise SpecError(fld, f"one observation has {largest} elements"
                             f"{' at the bounds' if any(isinstance(v, RuntimeSize) for v in sizes) else ''}"
                             ": its bytes overflow a 64-bit size_t")
    c_index = labels.index("C")
    if sizes[c_index] > MAX_CHANNELS:
        raise SpecError(f"{fld}[{c_index}]", f"{sizes[c_index]} channels is more than the limit "
                                             f"{MAX_CHANNELS} (2^20): every channel's scale and "
                                             "offset are compiled into the sources")
    return sizes


def _parse_num_channels(value: Any, fld: str, channels_in: int) -> int:
    if isinstance(value, str) and value.lower() == "auto":
        return channels_in
    n = parse_int(value, fld, 1, MAX_SIZE)
    if n != channels_in:
        raise SpecError(fld, f"{n} does not match the C entry of input_size ({channels_in})")
    return n


def _parse_num_groups(value: Any, fld: str, num_channels: int) -> tuple[int, str]:
    if isinstance(value, str):
        word = GROUP_WORDS.get(value.lower())
        if word is None:
            raise SpecError(fld, f"'{preview(value)}' is not a positive integer, "
                                 "'all-channels' or 'channel-wise'")
        return (1 if word == "all-channels" else num_channels), word
    g = parse_int(value, fld, 1, MAX_SIZE)
    if num_channels % g:
        raise SpecError(fld, f"{g} does not divide num_channels {num_channels}")
    return g, str(g)


def _check_epsilon_range(epsilon: float, fld: str, dtype: str) -> None:
    """Raise unless epsilon is a normal number that variance + epsilon cannot overflow with.

    The code adds epsilon to a variance in its accumulation type (single precision for
    single, half and bfloat16; double for double), and that variance can be as large as the
    type's largest value: the sum rounds to infinity, and every output of the group to the
    offset, once epsilon reaches half a unit in the last place of that largest value
    (2^103 in single precision, 2^970 in double). Epsilon is checked as the type rounds it.
    """
    acc = "double" if dtype == "double" else "single"
    ftype = np.float64 if acc == "double" else np.float32
    info = np.finfo(ftype)
    limit = 2.0 ** (info.maxexp - info.nmant - 2)    # half an ulp of the largest value
    with np.errstate(over="ignore"):
        rounded = float(ftype(epsilon))
    if not float(info.smallest_normal) <= rounded:
        raise SpecError(fld, f"{epsilon!r} is below the normal range of the {acc} arithmetic "
                             f"the code uses (smallest {float(info.smallest_normal):.3g})")
    if rounded >= limit:
        raise SpecError(fld, f"{epsilon!r} is too large for the {acc} arithmetic the code "
                             f"uses: variance + epsilon would overflow to infinity for large "
                             f"variances (epsilon must be below 2^{int(math.log2(limit))} = "
                             f"{limit:.3g})")
