"""Learned parameters (scale, offset): inline lists, .npy/.npz/.mat files and initializers.

Files are read only as far as needed to decide: a .npy header (or the .npy member of a .npz)
must promise exactly the channel count before its data is read, and a .mat file is listed
(whosmat) and then only the named variable is read, so an unrelated large variable costs
nothing. Nothing is ever unpickled. A module:function initializer runs the user's code only
with allow_code, and whatever it raises or exits with becomes a one-line SpecError.
"""

from __future__ import annotations

import importlib
import math
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib import format as npformat

from .errors import SpecError
from .fields import parse_int
from .files import check_path_text, open_regular, os_reason
from .text import comment_problem, preview

INITIALIZER_WORDS = {"ones": "ones", "zeros": "zeros",
                     "narrow-normal": "narrow-normal", "narrownormal": "narrow-normal"}
# module:function, ASCII only: the target is repeated in a generated comment.
CALLABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_]*\Z")
_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")


@dataclass(frozen=True)
class Initializer:
    """How to make a parameter vector when the spec gives no values."""

    kind: str  # ones | zeros | narrow-normal | callable
    target: str = ""
    seed: int | None = None


def parse_initializer(value: Any, fld: str) -> Initializer:
    """Return the initializer a spec value names (a word, module:function or a mapping)."""
    seed = None
    if isinstance(value, dict):
        unknown = sorted(preview(k) for k in value if k not in ("name", "seed"))
        if unknown:
            raise SpecError(f"{fld}.{unknown[0]}", "unknown key (allowed: name, seed)")
        if "seed" in value:
            seed = parse_int(value["seed"], f"{fld}.seed", 0, 2**63 - 1)
        value = value.get("name")
        fld = f"{fld}.name"
    if not isinstance(value, str):
        raise SpecError(fld, f"must be 'ones', 'zeros', 'narrow-normal' or 'module:function', "
                             f"got {preview(value)}")
    word = INITIALIZER_WORDS.get(value.lower())
    if word:
        return Initializer(word, seed=seed)
    if CALLABLE.match(value):
        return Initializer("callable", target=value, seed=seed)
    raise SpecError(fld, f"'{preview(value)}' is not 'ones', 'zeros', 'narrow-normal' or "
                         "'module:function'")


def initialize(init: Initializer, fld: str, n: int, seed: int, stream: int,
               allow_code: bool) -> tuple[tuple[float, ...], str]:
    """Return (n values, where they came from) made by an initializer."""
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
        module = importlib.import_module(module_name)
    except KeyboardInterrupt:
        raise
    except ImportError as exc:
        raise SpecError(fld, f"cannot import module '{module_name}': "
                             f"{preview(str(exc), 100)}") from None
    except BaseException as exc:    # the user's code: SystemExit, SyntaxError, anything
        raise SpecError(fld, f"importing module '{module_name}' {_raised(exc)}") from None
    try:
        func = getattr(module, func_name, None)
        if not callable(func):
            raise SpecError(fld, f"module '{module_name}' has no function '{func_name}'")
        return as_vector(func((n,)), fld, n), init.target
    except (KeyboardInterrupt, SpecError):
        raise
    except BaseException as exc:
        raise SpecError(fld, f"'{init.target}' {_raised(exc)}") from None


def _raised(exc: BaseException) -> str:
    """Describe on one line what the user's code raised."""
    if isinstance(exc, SystemExit):
        return f"called sys.exit({preview(exc.code)})"
    detail = preview(str(exc), 100) if str(exc) else ""
    return f"raised {type(exc).__name__}" + (f": {detail}" if detail else "")


def as_vector(value: Any, fld: str, n: int) -> tuple[float, ...]:
    """Return value as n finite floats (any shape that squeezes to n values)."""
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        raise SpecError(fld, "must be numbers") from None
    arr = arr.squeeze() if arr.ndim else arr.reshape(1)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1 or arr.size != n:
        raise SpecError(fld, f"must hold exactly num_channels={n} values after squeezing, "
                             f"got shape {tuple(np.shape(value))}")
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise SpecError(f"{fld}[{bad[0]}]", f"must be finite, got {arr[bad[0]]}")
    return tuple(float(v) for v in arr)


def check_representable(values: tuple[float, ...], fld: str, dtype: str) -> None:
    """Raise when a parameter does not fit the layer's dtype."""
    limit = {"single": float(np.finfo(np.float32).max), "half": 65504.0,
             "bfloat16": 3.3895313892515355e38, "double": math.inf}[dtype]
    for i, v in enumerate(values):
        if abs(v) > limit:
            raise SpecError(f"{fld}[{i}]", f"{v!r} overflows {dtype}")


def load_param(value: Any, fld: str, base_dir: Path, n: int) -> tuple[tuple[float, ...], str]:
    """Return (n values, their source) of a scale or offset given inline or as a file."""
    if isinstance(value, list):
        _check_leaf_count(value, fld, n)
        for i, v in enumerate(np.asarray(value, dtype=object).ravel()):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise SpecError(f"{fld}[{i}]", f"must be a number, got {preview(v)}")
        return as_vector(value, fld, n), "inline"
    if isinstance(value, (int, float)) and not isinstance(value, bool) and n == 1:
        return as_vector([value], fld, n), "inline"
    if not isinstance(value, dict):
        raise SpecError(fld, "must be a list of numbers or {file: ...} (with key: for .npz, "
                             f"var: for .mat), got {preview(value)}")
    unknown = sorted(preview(k) for k in value if k not in ("file", "key", "var"))
    if unknown:
        raise SpecError(f"{fld}.{unknown[0]}", "unknown key (allowed: file, key, var)")
    if not isinstance(value.get("file"), str) or not value["file"]:
        raise SpecError(f"{fld}.file", "must name a .npy, .npz or .mat file")
    check_path_text(value["file"], f"{fld}.file")
    for part in ("file", "key", "var"):
        if isinstance(value.get(part), str):
            problem = comment_problem(value[part])
            if problem:
                raise SpecError(f"{fld}.{part}", problem)
    name = value["file"]
    path = _resolve_param_path(name, f"{fld}.file", base_dir)
    suffix = path.suffix.lower()
    key = value.get("key")
    var = value.get("var")
    if suffix == ".npy":
        if "key" in value or "var" in value:
            raise SpecError(fld, "a .npy file holds one array; drop key/var")
        reader = _read_npy
    elif suffix == ".npz":
        if not isinstance(key, str):
            raise SpecError(f"{fld}.key", "required for a .npz file (the array's name)")
        reader = _read_npz
    elif suffix == ".mat":
        if not isinstance(var, str):
            raise SpecError(f"{fld}.var", "required for a .mat file (the variable's name)")
        reader = _read_mat
    else:
        raise SpecError(f"{fld}.file", f"'{preview(path.name)}' must end in .npy, .npz or .mat")
    with open_regular(path, f"{fld}.file", name) as fh:
        try:
            arr = reader(fh, fld, path.name, n, key if suffix == ".npz" else var)
        except SpecError:
            raise
        except OSError as exc:
            raise SpecError(f"{fld}.file", f"cannot read {preview(path.name)}: "
                                           f"{os_reason(exc)}") from None
        except Exception as exc:  # numpy/scipy raise many kinds on a corrupt file
            detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise SpecError(f"{fld}.file", f"cannot read {preview(path.name)}: "
                                           f"{preview(detail, 80)}") from None
    if not np.issubdtype(np.asarray(arr).dtype, np.number) or np.iscomplexobj(arr):
        raise SpecError(f"{fld}.file", f"{preview(path.name)} does not hold real numbers")
    return as_vector(arr, fld, n), name + (f"[{key}]" if "key" in value else
                                           f"[{var}]" if "var" in value else "")


def _read_npy(fh, fld: str, name: str, n: int, _member: str | None):
    _check_npy_header(fh, fld, name, n)
    fh.seek(0)
    return np.load(fh, allow_pickle=False)


def _read_npz(fh, fld: str, name: str, n: int, key: str):
    magic = fh.read(len(_NPY_MAGIC))
    fh.seek(0)
    if not magic.startswith(_ZIP_MAGIC):
        hint = " (it is a .npy file: name it .npy and drop key)" if magic == _NPY_MAGIC else ""
        raise SpecError(f"{fld}.file", f"{preview(name)} is not a .npz archive{hint}")
    with zipfile.ZipFile(fh) as archive:
        members = archive.namelist()
        arrays = [m[:-4] if m.endswith(".npy") else m for m in members]
        if key not in arrays:
            raise SpecError(f"{fld}.key", f"'{preview(key)}' not in {preview(name)} "
                                          f"(has {_listing(arrays)})")
        member = f"{key}.npy" if f"{key}.npy" in members else key
        with archive.open(member) as inner:
            _check_npy_header(inner, fld, f"{preview(name)}[{preview(key)}]", n)
        with archive.open(member) as inner:
            return npformat.read_array(inner, allow_pickle=False)


def _read_mat(fh, fld: str, name: str, n: int, var: str):
    try:
        from scipy.io import loadmat, whosmat
    except ImportError:
        raise SpecError(f"{fld}.file", "reading .mat files needs scipy: "
                                       "pip install 'gncodegen[mat]'") from None
    listed = {entry[0]: entry for entry in whosmat(fh)}
    if var not in listed:
        names = sorted(k for k in listed if not k.startswith("__"))
        raise SpecError(f"{fld}.var", f"'{preview(var)}' not in {preview(name)} "
                                      f"(has {_listing(names)})")
    _, shape, kind = listed[var]
    if math.prod(shape) != n:
        raise SpecError(fld, f"must hold exactly num_channels={n} values after squeezing, "
                             f"got shape {tuple(shape)}")
    if kind in ("cell", "struct", "object", "char", "function", "opaque", "sparse"):
        raise SpecError(f"{fld}.file", f"{preview(name)}[{preview(var)}] is a MATLAB {kind}, "
                                       "not an array of real numbers")
    fh.seek(0)
    return loadmat(fh, variable_names=[var])[var]


def _listing(names: list[str]) -> str:
    """Return names for a message: comma-separated, escaped and cut short."""
    return preview(", ".join(names[:100]), 80) if names else "nothing"


def _check_leaf_count(value: list, fld: str, n: int) -> None:
    """Raise unless a nested list holds at most n numbers (YAML aliases share lists)."""
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


def _check_npy_header(fh, fld: str, name: str, n: int) -> None:
    """Raise unless a .npy stream's header promises exactly n plain numbers (read no data)."""
    try:
        version = npformat.read_magic(fh)
        if version == (1, 0):
            shape, _, dtype = npformat.read_array_header_1_0(fh)
        else:
            shape, _, dtype = npformat.read_array_header_2_0(fh)
    except ValueError as exc:
        raise SpecError(f"{fld}.file", f"cannot read {name}: not a .npy array "
                                       f"({preview(str(exc), 60)})") from None
    if dtype.hasobject:
        raise SpecError(f"{fld}.file", f"{name} holds pickled Python objects; gncodegen never "
                                       "unpickles parameter files")
    if math.prod(shape) != n:
        raise SpecError(fld, f"must hold exactly num_channels={n} values after squeezing, "
                             f"got shape {tuple(shape)}")


def _resolve_param_path(name: str, fld: str, base_dir: Path) -> Path:
    """Resolve a parameter file; relative paths may not leave the spec's folder."""
    try:
        raw = Path(name).expanduser()
    except RuntimeError:                # ~user that does not exist
        raw = Path(name)
    try:
        if raw.is_absolute():
            path = raw.resolve()
        else:
            path = (base_dir / raw).resolve()
            try:
                path.relative_to(base_dir.resolve())
            except ValueError:
                raise SpecError(fld, f"'{preview(name)}' leaves the spec's folder; give an "
                                     "absolute path to read a file elsewhere") from None
    except OSError as exc:
        raise SpecError(fld, f"cannot open {preview(name)}: {os_reason(exc)}") from None
    except RuntimeError:                # a symbolic link loop (Python before 3.13)
        raise SpecError(fld, f"cannot open {preview(name)}: too many levels of symbolic "
                             "links") from None
    return path
