"""Layer specs: YAML in, validated frozen objects out (DESIGN.md section 2).

All validation lives here. Every error is a SpecError whose message names the field (as
the user spelled it, prefixed by ``layers[i].`` in multi-layer files) and the rule broken.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from .errors import SpecError

# C89/C99/C11 keywords plus C++ keywords: the header must also be valid C++.
C_KEYWORDS = frozenset(
    """
    auto break case char const continue default do double else enum extern float for goto if
    inline int long register restrict return short signed sizeof static struct switch typedef
    union unsigned void volatile while _Alignas _Alignof _Atomic _Bool _Complex _Generic
    _Imaginary _Noreturn _Static_assert _Thread_local alignas alignof and and_eq asm bitand bitor
    bool catch char16_t char32_t class compl constexpr const_cast decltype delete dynamic_cast
    explicit export false friend mutable namespace new noexcept not not_eq nullptr operator or
    or_eq private protected public reinterpret_cast static_assert static_cast template this
    thread_local throw true try typeid typename using virtual wchar_t xor xor_eq
    """.split()
)
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
# A layer named like a header that generated or user code includes would write <name>.h that
# shadows it wherever the output folder is on the include path (C standard library, the
# headers our targets include, Python.h for the cffi build).
SHADOWED_HEADERS = frozenset(
    """
    assert complex ctype errno fenv float inttypes iso646 limits locale math setjmp signal
    stdalign stdarg stdatomic stdbit stdbool stdckdint stddef stdint stdio stdlib stdnoreturn
    string tgmath threads time uchar wchar wctype unistd pthread omp immintrin arm_neon
    python cuda cuda_runtime cuda_fp16 cuda_bf16 cooperative_groups gn_cuda_emulation fw_io
    """.split()
)
MAX_NAME_LENGTH = 48
# Files the targets write per layer besides <name>.h/.c: another layer named <name><suffix>
# would write over them.
GENERATED_SUFFIXES = (("_cuda", "CUDA header"), ("_harness", "test harness"))

DTYPES = {"single": "single", "float32": "single", "float": "single",
          "double": "double", "float64": "double",
          "half": "half", "float16": "half", "bfloat16": "bfloat16"}
LAYOUTS = ("column-major", "row-major")
GROUP_WORDS = {"all-channels": "all-channels", "allchannels": "all-channels",
               "channel-wise": "channel-wise", "channelwise": "channel-wise"}
INITIALIZER_WORDS = {"ones": "ones", "zeros": "zeros",
                     "narrow-normal": "narrow-normal", "narrownormal": "narrow-normal"}
FORMAT_LETTERS = set("SCBTU")
MAX_DIMS = 8
MAX_SIZE = 2**31 - 1
# An observation must be addressable with 32-bit int indexing and must fit in memory for
# verification: 2^28 elements is 1 GiB in single precision.
MAX_OBSERVATION_NUMEL = 2**28
MAX_THREADS = 256
CUDA_ARCHS = (50, 52, 53, 60, 61, 62, 70, 72, 75, 80, 86, 87, 89, 90, 100, 103, 110, 120, 121)

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
    "threads": ("Threads",),
    "cuda_arch": ("CudaArch",),
}
ALIASES = {alias: key for key, aliases in KEYS.items() for alias in (key, *aliases)}
REQUIRED = ("num_groups", "format", "input_size")


@dataclass(frozen=True)
class Layer:
    """One validated group normalization layer; every value resolved and checked."""

    name: str
    num_groups: int
    num_channels: int
    format: str
    layout: str
    input_size: tuple[int, ...]
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
    threads: int = 1
    cuda_arch: tuple[int, ...] = (80, 90)
    num_groups_given: str = ""
    field_prefix: str = ""

    @property
    def has_batch(self) -> bool:
        """True when the format carries an observation (B) dimension."""
        return "B" in self.format

    @property
    def channels_per_group(self) -> int:
        """Channels in each group."""
        return self.num_channels // self.num_groups

    @property
    def observation_numel(self) -> int:
        """Elements in one observation (all non-B dimensions)."""
        return math.prod(self.input_size)

    def dims(self) -> tuple[tuple[str, int | None], ...]:
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


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects a mapping holding the same key twice."""


def _construct_mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if isinstance(key, (str, int, float, bool)) and key in seen:
            raise SpecError(str(key), f"key given twice (line {key_node.start_mark.line + 1})")
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_spec(path: str | Path, allow_code: bool = False) -> Spec:
    """Return the validated Spec read from a YAML file."""
    p = Path(path)
    bad = [c for c in p.name if ord(c) < 32 or ord(c) == 127]
    if bad:
        # The file's name is printed in generated comments (C, CMake): a newline there
        # would start a line of code.
        raise SpecError("spec", f"the file name holds control character {_printable(bad[0])}; "
                                "rename the file")
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise SpecError("spec", f"file not found: {p}") from None
    except OSError as exc:
        raise SpecError("spec", f"cannot read {p}: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise SpecError("spec", "file is not UTF-8 text") from None
    stem = p.stem
    return parse_spec(text, base_dir=p.resolve().parent, stem=stem, path=str(p),
                      allow_code=allow_code, sha256=hashlib.sha256(raw).hexdigest())


def parse_spec(text: str, base_dir: Path, stem: str, path: str = "<string>",
               allow_code: bool = False, sha256: str | None = None) -> Spec:
    """Return the validated Spec for YAML text whose relative paths resolve in base_dir."""
    try:
        doc = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.constructor.ConstructorError as exc:
        # A tag safe_load cannot build: never an object, say which tag was refused.
        found = re.search(r"tag '([^']*)'", str(exc.problem))
        tag = found.group(1).replace("tag:yaml.org,2002:", "!!") if found else "?"
        line = f" at line {exc.problem_mark.line + 1}" if exc.problem_mark else ""
        raise SpecError("spec", f"tag '{_printable(tag, 60)}'{line} is not allowed: specs are "
                                "plain YAML (no tags that build objects)") from None
    except yaml.composer.ComposerError as exc:
        if "another document" not in str(exc.problem):
            raise SpecError("spec", f"YAML error: {exc.problem}") from None
        line = f" (line {exc.problem_mark.line + 1})" if exc.problem_mark else ""
        raise SpecError("spec", f"a spec file holds one YAML document; found another{line}"
                        ) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise SpecError("spec", f"YAML syntax error{where}: {exc.problem}") from None
    except yaml.YAMLError as exc:
        raise SpecError("spec", f"YAML error: {str(exc).splitlines()[0]}") from None
    if sha256 is None:
        sha256 = hashlib.sha256(text.encode()).hexdigest()
    if not isinstance(doc, dict):
        kind = "empty" if doc is None else type(doc).__name__
        raise SpecError("spec", f"must be a mapping of layer properties, got {kind}")
    if "layers" in doc:
        extra = sorted(str(k) for k in doc if k != "layers")
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
            layers.append(_parse_layer(item, prefix, f"{stem}_{i}", base_dir, allow_code))
        names = [layer.name for layer in layers]
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
    else:
        layers = [_parse_layer(doc, "", stem, base_dir, allow_code)]
    return Spec(path=path, stem=stem, sha256=sha256, layers=tuple(layers))


def _canonical_keys(doc: dict, prefix: str) -> dict[str, tuple[str, Any]]:
    """Map canonical key -> (key as written, value), rejecting unknown and repeated keys."""
    out: dict[str, tuple[str, Any]] = {}
    for key, value in doc.items():
        if not isinstance(key, str):
            raise SpecError(f"{prefix}{key}", "keys must be strings")
        canon = ALIASES.get(key)
        if canon is None:
            close = difflib.get_close_matches(key, list(ALIASES), n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise SpecError(f"{prefix}{_printable(key)}", f"unknown key{hint}")
        if canon in out:
            raise SpecError(f"{prefix}{key}", f"same property as '{out[canon][0]}', given twice")
        out[canon] = (key, value)
    return out


def _printable(value: Any, limit: int = 40) -> str:
    """Return a short one-line rendering of a user value for messages."""
    text = repr(value) if not isinstance(value, str) else value
    text = text.encode("unicode_escape").decode("ascii")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _parse_layer(doc: dict, prefix: str, default_name: str, base_dir: Path,
                 allow_code: bool) -> Layer:
    keys = _canonical_keys(doc, prefix)
    for req in REQUIRED:
        if req not in keys:
            raise SpecError(f"{prefix}{req}", "required key is missing")

    def fname(key: str) -> str:
        return prefix + (keys[key][0] if key in keys else key)

    def get(key: str, default: Any = None) -> Any:
        return keys[key][1] if key in keys else default

    name = _parse_name(get("name", default_name), fname("name"), given="name" in keys)
    fmt = _parse_format(get("format"), fname("format"))
    layout = _parse_choice(get("layout", "column-major"), fname("layout"), {v: v for v in LAYOUTS})
    input_size = _parse_input_size(get("input_size"), fname("input_size"), fmt)
    channels_in = input_size[[ch for ch in fmt if ch != "B"].index("C")]
    num_channels = _parse_num_channels(get("num_channels", "auto"), fname("num_channels"),
                                       channels_in)
    num_groups, groups_given = _parse_num_groups(get("num_groups"), fname("num_groups"),
                                                 num_channels)
    epsilon = _parse_number(get("epsilon", 1e-5), fname("epsilon"), positive=True)
    dtype = _parse_choice(get("dtype", "single"), fname("dtype"), DTYPES)
    _check_epsilon_range(epsilon, fname("epsilon"), dtype)
    seed = _parse_int(get("seed", 0), fname("seed"), minimum=0, maximum=2**63 - 1)
    factors = {k: _parse_number(get(k, 1.0), fname(k), positive=False)
               for k in ("scale_learn_rate_factor", "offset_learn_rate_factor",
                         "scale_l2_factor", "offset_l2_factor")}
    threads = _parse_int(get("threads", 1), fname("threads"), minimum=1, maximum=MAX_THREADS)
    cuda_arch = _parse_cuda_arch(get("cuda_arch", [80, 90]), fname("cuda_arch"))

    params = {}
    for which, default_init, stream in (("scale", "ones", 0), ("offset", "zeros", 1)):
        init_key = f"{which}_initializer"
        init = _parse_initializer(get(init_key, default_init), fname(init_key))
        if which in keys and keys[which][1] is not None:
            values, source = _load_param(keys[which][1], fname(which), base_dir, num_channels)
        else:
            values, source = _initialize(init, fname(init_key), num_channels, seed, stream,
                                         allow_code)
        _check_representable(values, fname(which), dtype)
        params[which] = (values, source)

    return Layer(
        name=name, num_groups=num_groups, num_channels=num_channels, format=fmt, layout=layout,
        input_size=input_size, epsilon=epsilon, dtype=dtype,
        scale=params["scale"][0], offset=params["offset"][0],
        scale_source=params["scale"][1], offset_source=params["offset"][1],
        threads=threads, cuda_arch=cuda_arch, num_groups_given=groups_given,
        field_prefix=prefix, **factors,
    )


def _parse_name(value: Any, fld: str, given: bool) -> str:
    if not isinstance(value, str):
        raise SpecError(fld, f"must be a C identifier string, got {_printable(value)}")
    if not IDENTIFIER.match(value):
        rule = "must be a C identifier ([A-Za-z_][A-Za-z0-9_]*)"
        if not given:
            rule += f"; the file stem '{_printable(value)}' is not one, so set 'name'"
        else:
            rule = f"'{_printable(value)}' " + rule
        raise SpecError(fld, rule)
    if value in C_KEYWORDS:
        raise SpecError(fld, f"'{value}' is a C/C++ keyword")
    if value.lower() in SHADOWED_HEADERS:
        raise SpecError(fld, f"'{value}' would write {value}.h, which shadows the standard header "
                             f"<{value.lower()}.h>; choose another name")
    if value.startswith("__") or re.match(r"_[A-Z]", value):
        raise SpecError(fld, f"'{value}' is reserved for the C implementation")
    if len(value) > MAX_NAME_LENGTH:
        raise SpecError(fld, f"must be at most {MAX_NAME_LENGTH} characters")
    return value


def _parse_choice(value: Any, fld: str, choices: dict[str, str]) -> str:
    if not isinstance(value, str):
        raise SpecError(fld, f"must be one of {', '.join(sorted(set(choices.values())))}, "
                             f"got {_printable(value)}")
    canon = choices.get(value.lower())
    if canon is None:
        close = difflib.get_close_matches(value.lower(), list(choices), n=1, cutoff=0.5)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise SpecError(fld, f"'{_printable(value)}' is not one of "
                             f"{', '.join(sorted(set(choices.values())))}{hint}")
    return canon


def _parse_format(value: Any, fld: str) -> str:
    if not isinstance(value, str) or not value:
        raise SpecError(fld, f"must be a string of dimension labels S C B T U, got "
                             f"{_printable(value)}")
    bad = sorted(set(value) - FORMAT_LETTERS)
    if bad:
        raise SpecError(fld, f"'{_printable(value)}' has label '{_printable(bad[0])}'; "
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


def _parse_int(value: Any, fld: str, minimum: int, maximum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise SpecError(fld, f"must be an integer, got {_printable(value)}")
    if value < minimum:
        raise SpecError(fld, f"must be at least {minimum}, got {value}")
    if value > maximum:
        raise SpecError(fld, f"must be at most {maximum}, got {value}")
    return value


def _parse_input_size(value: Any, fld: str, fmt: str) -> tuple[int, ...]:
    labels = [ch for ch in fmt if ch != "B"]
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list):
        raise SpecError(fld, f"must be a list of {len(labels)} sizes (one per non-B label of "
                             f"'{fmt}'), got {_printable(value)}")
    if len(value) != len(labels):
        raise SpecError(fld, f"has {len(value)} sizes but format '{fmt}' has {len(labels)} "
                             f"non-B labels ({''.join(labels)})")
    sizes = tuple(_parse_int(v, f"{fld}[{i}]", 1, MAX_SIZE) for i, v in enumerate(value))
    if math.prod(sizes) > MAX_OBSERVATION_NUMEL:
        raise SpecError(fld, f"one observation has {math.prod(sizes)} elements, more than the "
                             f"limit {MAX_OBSERVATION_NUMEL} (2^28)")
    return sizes


def _parse_num_channels(value: Any, fld: str, channels_in: int) -> int:
    if isinstance(value, str) and value.lower() == "auto":
        return channels_in
    n = _parse_int(value, fld, 1, MAX_SIZE)
    if n != channels_in:
        raise SpecError(fld, f"{n} does not match the C entry of input_size ({channels_in})")
    return n


def _parse_num_groups(value: Any, fld: str, num_channels: int) -> tuple[int, str]:
    if isinstance(value, str):
        word = GROUP_WORDS.get(value.lower())
        if word is None:
            raise SpecError(fld, f"'{_printable(value)}' is not a positive integer, "
                                 "'all-channels' or 'channel-wise'")
        return (1 if word == "all-channels" else num_channels), word
    g = _parse_int(value, fld, 1, MAX_SIZE)
    if num_channels % g:
        raise SpecError(fld, f"{g} does not divide num_channels {num_channels}")
    return g, str(g)


def _parse_number(value: Any, fld: str, positive: bool) -> float:
    if isinstance(value, bool):
        raise SpecError(fld, f"must be a number, got {value}")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise SpecError(fld, f"must be a number, got '{_printable(value)}'") from None
    if not isinstance(value, (int, float)):
        raise SpecError(fld, f"must be a number, got {_printable(value)}")
    value = float(value)
    if not math.isfinite(value):
        raise SpecError(fld, f"must be finite, got {value}")
    if positive and value <= 0:
        raise SpecError(fld, f"must be positive, got {value!r}")
    if not positive and value < 0:
        raise SpecError(fld, f"must be non-negative, got {value!r}")
    return value


def _check_epsilon_range(epsilon: float, fld: str, dtype: str) -> None:
    """Raise unless epsilon is a normal number of the type the code computes in."""
    acc = "double" if dtype == "double" else "single"
    info = np.finfo(np.float64 if acc == "double" else np.float32)
    if not float(info.smallest_normal) <= epsilon <= float(info.max):
        raise SpecError(fld, f"{epsilon!r} is outside the normal range of the {acc} arithmetic "
                             f"the code uses ({float(info.smallest_normal):.3g} to "
                             f"{float(info.max):.3g})")


def _parse_cuda_arch(value: Any, fld: str) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list) or not value:
        raise SpecError(fld, f"must be a list of compute capabilities like [80, 90], got "
                             f"{_printable(value)}")
    out = []
    for i, v in enumerate(value):
        if isinstance(v, str) and re.fullmatch(r"sm_\d+", v):
            v = int(v[3:])
        if isinstance(v, bool) or not isinstance(v, int) or v not in CUDA_ARCHS:
            raise SpecError(f"{fld}[{i}]", f"{_printable(v)} is not a known compute capability "
                                           f"({', '.join(map(str, CUDA_ARCHS))})")
        if v not in out:
            out.append(v)
    return tuple(sorted(out))


@dataclass(frozen=True)
class _Initializer:
    kind: str  # ones | zeros | narrow-normal | callable
    target: str = ""
    seed: int | None = None


def _parse_initializer(value: Any, fld: str) -> _Initializer:
    seed = None
    if isinstance(value, dict):
        unknown = sorted(set(value) - {"name", "seed"})
        if unknown:
            raise SpecError(f"{fld}.{unknown[0]}", "unknown key (allowed: name, seed)")
        if "seed" in value:
            seed = _parse_int(value["seed"], f"{fld}.seed", 0, 2**63 - 1)
        value = value.get("name")
        fld = f"{fld}.name"
    if not isinstance(value, str):
        raise SpecError(fld, f"must be 'ones', 'zeros', 'narrow-normal' or 'module:function', "
                             f"got {_printable(value)}")
    word = INITIALIZER_WORDS.get(value.lower())
    if word:
        return _Initializer(word, seed=seed)
    if re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", value):
        return _Initializer("callable", target=value, seed=seed)
    raise SpecError(fld, f"'{_printable(value)}' is not 'ones', 'zeros', 'narrow-normal' or "
                         "'module:function'")


def _initialize(init: _Initializer, fld: str, n: int, seed: int, stream: int,
                allow_code: bool) -> tuple[tuple[float, ...], str]:
    if init.kind == "ones":
        return (1.0,) * n, "ones"
    if init.kind == "zeros":
        return (0.0,) * n, "zeros"
    if init.kind == "narrow-normal":
        s = seed if init.seed is None else init.seed
        rng = np.random.default_rng([s, stream])
        return tuple(float(v) for v in rng.normal(0.0, 0.01, n)), f"narrow-normal(seed={s})"
    if not allow_code:
        raise SpecError(fld, f"'{init.target}' runs Python code; pass --allow-code to allow it")
    module_name, func_name = init.target.split(":")
    try:
        func = getattr(importlib.import_module(module_name), func_name)
    except ImportError as exc:
        raise SpecError(fld, f"cannot import module '{module_name}': {exc}") from None
    except AttributeError:
        raise SpecError(fld, f"module '{module_name}' has no function '{func_name}'") from None
    try:
        result = func((n,))
    except Exception as exc:  # the user's code: report whatever it raised, on one line
        raise SpecError(fld, f"'{init.target}' raised {type(exc).__name__}: {exc}") from None
    return _as_vector(result, fld, n), init.target


def _as_vector(value: Any, fld: str, n: int) -> tuple[float, ...]:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise SpecError(fld, "must be numbers") from None
    arr = arr.squeeze() if arr.ndim else arr.reshape(1)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1 or arr.size != n:
        raise SpecError(fld, f"must hold exactly num_channels={n} values after squeezing, "
                             f"got shape {tuple(np.asarray(value).shape)}")
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise SpecError(f"{fld}[{bad[0]}]", f"must be finite, got {arr[bad[0]]}")
    return tuple(float(v) for v in arr)


def _load_param(value: Any, fld: str, base_dir: Path, n: int) -> tuple[tuple[float, ...], str]:
    if isinstance(value, list):
        _check_leaf_count(value, fld, n)
        for i, v in enumerate(np.asarray(value, dtype=object).ravel()):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise SpecError(f"{fld}[{i}]", f"must be a number, got {_printable(v)}")
        return _as_vector(value, fld, n), "inline"
    if isinstance(value, (int, float)) and not isinstance(value, bool) and n == 1:
        return _as_vector([value], fld, n), "inline"
    if not isinstance(value, dict):
        raise SpecError(fld, "must be a list of numbers or {file: ...} (with key: for .npz, "
                             f"var: for .mat), got {_printable(value)}")
    unknown = sorted(set(value) - {"file", "key", "var"})
    if unknown:
        raise SpecError(f"{fld}.{unknown[0]}", "unknown key (allowed: file, key, var)")
    if not isinstance(value.get("file"), str) or not value["file"]:
        raise SpecError(f"{fld}.file", "must name a .npy, .npz or .mat file")
    path = _resolve_param_path(value["file"], f"{fld}.file", base_dir)
    for part in ("file", "key", "var"):
        if isinstance(value.get(part), str):
            _check_comment_safe(value[part], f"{fld}.{part}")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        if "key" in value or "var" in value:
            raise SpecError(fld, "a .npy file holds one array; drop key/var")
        def read_npy():
            with open(path, "rb") as fh:
                _check_npy_header(fh, fld, path.name, n)
                fh.seek(0)
                return np.load(fh, allow_pickle=False)
        arr = _read_array(read_npy, f"{fld}.file", path)
    elif suffix == ".npz":
        key = value.get("key")
        if not isinstance(key, str):
            raise SpecError(f"{fld}.key", "required for a .npz file (the array's name)")

        def read_npz():
            with np.load(path, allow_pickle=False) as z:
                if key not in z.files:
                    raise SpecError(f"{fld}.key", f"'{_printable(key)}' not in {path.name} "
                                                  f"(has {', '.join(z.files) or 'nothing'})")
                member = f"{key}.npy" if f"{key}.npy" in z.zip.namelist() else key
                with z.zip.open(member) as fh:
                    _check_npy_header(fh, fld, f"{path.name}[{key}]", n)
                return z[key]
        arr = _read_array(read_npz, f"{fld}.file", path)
    elif suffix == ".mat":
        var = value.get("var")
        if not isinstance(var, str):
            raise SpecError(f"{fld}.var", "required for a .mat file (the variable's name)")
        try:
            from scipy.io import loadmat
        except ImportError:
            raise SpecError(f"{fld}.file", "reading .mat files needs scipy: "
                                           "pip install 'gncodegen[mat]'") from None

        def read_mat():
            data = loadmat(str(path))
            if var not in data:
                names = sorted(k for k in data if not k.startswith("__"))
                raise SpecError(f"{fld}.var", f"'{_printable(var)}' not in {path.name} "
                                              f"(has {', '.join(names) or 'nothing'})")
            return data[var]
        arr = _read_array(read_mat, f"{fld}.file", path)
    else:
        raise SpecError(f"{fld}.file", f"'{_printable(path.name)}' must end in .npy, .npz or .mat")
    if not np.issubdtype(np.asarray(arr).dtype, np.number) or np.iscomplexobj(arr):
        raise SpecError(f"{fld}.file", f"{path.name} does not hold real numbers")
    return _as_vector(arr, fld, n), f"{value['file']}" + (
        f"[{value['key']}]" if "key" in value else f"[{value['var']}]" if "var" in value else "")


def _check_leaf_count(value: list, fld: str, n: int) -> None:
    """Raise unless a nested list holds at most n numbers (YAML aliases can nest a billion)."""
    count, stack = 0, [value]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        else:
            count += 1
            if count > n:
                raise SpecError(fld, f"must hold exactly num_channels={n} values after "
                                     f"squeezing, got more")


def _check_comment_safe(text: str, fld: str) -> None:
    """Raise when text could end or nest the C comment the parameter source is named in."""
    bad = [c for c in text if ord(c) < 32 or ord(c) == 127]
    if bad:
        raise SpecError(fld, f"holds control character {_printable(bad[0])}")
    for seq in ("*/", "/*"):
        if seq in text:
            raise SpecError(fld, f"holds '{seq}', which would end or nest the C comment that "
                                 "names the parameter source")


def _check_npy_header(fh, fld: str, name: str, n: int) -> None:
    """Raise unless a .npy stream's header promises exactly n plain numbers (read no data)."""
    from numpy.lib import format as npformat
    try:
        version = npformat.read_magic(fh)
        if version == (1, 0):
            shape, _, dtype = npformat.read_array_header_1_0(fh)
        else:
            shape, _, dtype = npformat.read_array_header_2_0(fh)
    except ValueError as exc:
        raise SpecError(f"{fld}.file", f"cannot read {name}: not a .npy array "
                                       f"({_printable(str(exc), 60)})") from None
    if dtype.hasobject:
        raise SpecError(f"{fld}.file", f"{name} holds pickled Python objects; gncodegen never "
                                       "unpickles parameter files")
    if math.prod(shape) != n:
        raise SpecError(fld, f"must hold exactly num_channels={n} values after squeezing, "
                             f"got shape {tuple(shape)}")


def _resolve_param_path(name: str, fld: str, base_dir: Path) -> Path:
    """Resolve a parameter file; relative paths may not leave the spec's folder."""
    if "\x00" in name:
        raise SpecError(fld, "file name holds a NUL character")
    raw = Path(name).expanduser()
    if raw.is_absolute():
        path = raw.resolve()
    else:
        path = (base_dir / raw).resolve()
        try:
            path.relative_to(base_dir.resolve())
        except ValueError:
            raise SpecError(fld, f"'{_printable(name)}' leaves the spec's folder; give an "
                                 "absolute path to read a file elsewhere") from None
    if not path.exists():
        raise SpecError(fld, f"file not found: {_printable(name)}")
    if not path.is_file():
        raise SpecError(fld, f"not a regular file: {_printable(name)}")
    return path


def _read_array(reader, fld: str, path: Path):
    try:
        return reader()
    except SpecError:
        raise
    except Exception as exc:  # numpy/scipy raise many kinds on a corrupt file
        raise SpecError(fld, f"cannot read {path.name}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None


def _check_representable(values: tuple[float, ...], fld: str, dtype: str) -> None:
    limit = {"single": float(np.finfo(np.float32).max), "half": 65504.0,
             "bfloat16": 3.3895313892515355e38, "double": math.inf}[dtype]
    for i, v in enumerate(values):
        if abs(v) > limit:
            raise SpecError(f"{fld}[{i}]", f"{v!r} overflows {dtype}")
