"""Bad and hostile specs through the real command line.

Every case runs `gncodegen build SPEC` in a subprocess whose working folder already holds
`generated/<stem>/` from an earlier good build, so the default output folder exists. Each must
print exactly one line, `error: <field>: <rule>`, on stderr and nothing on stdout, exit with
status 2, show no traceback, and leave every byte under the test's folder (spec folder, output
folder, its parent, files outside the spec folder, the build cache) as it was. Cases that try to
run code (YAML tags, pickles, initializers) also check that the code's side effect never happened.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import numpy.lib.format as npformat
import pytest

GOOD = {"name": "layer", "num_groups": "4", "format": "SSCB", "input_size": "[4, 4, 8]"}
# -P: like the console script, do not put the working folder on sys.path.
CLI = [sys.executable, "-P", "-m", "gncodegen.cli"]


def spec(drop: tuple[str, ...] = (), **values: str) -> str:
    """Return the good spec's YAML with keys replaced or added (raw YAML values) or dropped."""
    doc = {k: v for k, v in GOOD.items() if k not in drop}
    doc.update(values)
    return "".join(f"{k}: {v}\n" for k, v in doc.items())


def npy_bytes(arr, allow_pickle: bool = False) -> bytes:
    """Return the bytes of a .npy file holding arr."""
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=allow_pickle)
    return buf.getvalue()


class _Mkdir:
    """Pickles to a call of os.mkdir(path): the side effect an unpickling would have."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


MARKER = "PWNED"  # created (under the test's folder) by any payload that runs


@dataclass(frozen=True)
class Case:
    """One bad spec: its text, the field the error must name and a pattern its rule must match."""

    id: str
    text: str | bytes
    field: str
    rule: str
    files: Callable[[Path, Path], None] | None = None  # (spec folder, folder outside it)
    stem: str = "layer"


def _files(**contents: bytes | str) -> Callable[[Path, Path], None]:
    """Return a file maker writing contents into the spec folder."""
    def make(work: Path, _outside: Path) -> None:
        for name, data in contents.items():
            path = work / name
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(data, str):
                data = data.encode()
            path.write_bytes(data)
    return make


def _outside_npy(work: Path, outside: Path) -> None:
    (outside / "secret.npy").write_bytes(npy_bytes(np.ones(8)))


def _symlink_out(work: Path, outside: Path) -> None:
    _outside_npy(work, outside)
    (work / "link.npy").symlink_to(outside / "secret.npy")


def _dangling(work: Path, _outside: Path) -> None:
    (work / "gone.npy").symlink_to(work / "never-written.npy")


def _directory(work: Path, _outside: Path) -> None:
    (work / "scale.npy").mkdir()


def _fifo(work: Path, _outside: Path) -> None:
    os.mkfifo(work / "scale.npy")


def _pickled(work: Path, _outside: Path) -> None:
    payload = np.array([_Mkdir(str(work.parent / MARKER))] * 8, dtype=object)
    (work / "scale.npy").write_bytes(npy_bytes(payload, allow_pickle=True))


def _pickled_npz(work: Path, _outside: Path) -> None:
    payload = np.array([_Mkdir(str(work.parent / MARKER))] * 8, dtype=object)
    with open(work / "p.npz", "wb") as f:
        np.savez(f, scale=payload)


def _raw_pickle(work: Path, _outside: Path) -> None:
    # A plain pickle named .npy: numpy would unpickle it only with allow_pickle=True.
    (work / "scale.npy").write_bytes(pickle.dumps(_Mkdir(str(work.parent / MARKER))))


def _huge_header(work: Path, _outside: Path) -> None:
    # A header claiming 2^40 float64 values (8 TiB) over no data at all.
    buf = io.BytesIO()
    npformat.write_array_header_1_0(buf, {"descr": "<f8", "fortran_order": False,
                                          "shape": (2**40,)})
    (work / "scale.npy").write_bytes(buf.getvalue())


def _injected_key_npz(work: Path, _outside: Path) -> None:
    # A real array under a key that would close the C comment the source is described in.
    with open(work / "p.npz", "wb") as f:
        np.savez(f, **{"k*/ int evil = 1; /*": np.ones(8)})


def _injected_dir(work: Path, _outside: Path) -> None:
    # A real file whose path would close the C comment the source is described in.
    d = work / "x*" / " int evil = 1; "
    d.mkdir(parents=True)
    (d / "*.npy").write_bytes(npy_bytes(np.ones(8)))


def _evil_module(work: Path, _outside: Path) -> None:
    (work / "gn_evil.py").write_text(
        f"import os\nos.mkdir({str(work.parent / MARKER)!r})\n"
        "def init(shape):\n    return [1.0] * shape[0]\n")


def _laughs(levels: int) -> str:
    """Return a YAML list of 10**levels ones built from aliases (a billion-laughs bomb)."""
    text = "&a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"
    for k in range(1, levels):
        text = f"&a{k} [{text}" + f", *a{k - 1}" * 9 + "]"
    return text


def _nested(depth: int) -> str:
    """Return a YAML flow list nested depth levels deep."""
    return "[" * depth + "1" + "]" * depth


ONES8 = "[1, 1, 1, 1, 1, 1, 1, 1]"
TWO_LAYERS = """\
layers:
  - name: {a}
    num_groups: 2
    format: CB
    input_size: [4]
  - name: {b}
    num_groups: {g}
    format: CB
    input_size: [4]
"""

CASES = [
    # groups and channels
    Case("groups-not-dividing", spec(num_groups="3"), "num_groups", r"3 does not divide num_channels 8"),
    Case("groups-more-than-channels", spec(num_groups="16"), "num_groups", r"does not divide"),
    Case("groups-zero", spec(num_groups="0"), "num_groups", r"at least 1"),
    Case("groups-negative", spec(num_groups="-2"), "num_groups", r"at least 1"),
    Case("groups-fraction", spec(num_groups="2.5"), "num_groups", r"must be an integer"),
    Case("groups-bad-word", spec(num_groups="some-channels"), "num_groups", r"'all-channels' or 'channel-wise'"),
    Case("groups-bool", spec(num_groups="true"), "num_groups", r"must be an integer"),
    Case("channels-mismatch", spec(num_channels="6"), "num_channels", r"6 does not match .*\(8\)"),
    Case("channels-zero", spec(num_channels="0"), "num_channels", r"at least 1"),
    # epsilon
    Case("epsilon-zero", spec(epsilon="0"), "epsilon", r"must be positive"),
    Case("epsilon-negative", spec(epsilon="-1e-5"), "epsilon", r"must be positive"),
    Case("epsilon-text", spec(epsilon="small"), "epsilon", r"must be a number"),
    Case("epsilon-nan", spec(epsilon=".nan"), "epsilon", r"must be finite"),
    Case("epsilon-inf", spec(epsilon=".inf"), "epsilon", r"must be finite"),
    Case("epsilon-minus-inf", spec(epsilon="-.inf"), "epsilon", r"must be finite"),
    Case("epsilon-nan-string", spec(epsilon="'nan'"), "epsilon", r"must be a number, got 'nan'"),
    Case("epsilon-list", spec(epsilon="[1e-5]"), "epsilon", r"must be a number"),
    Case("epsilon-bool", spec(epsilon="yes"), "epsilon", r"must be a number"),
    Case("epsilon-overflows-single", spec(epsilon="1.0e+39"), "epsilon", r"single"),
    Case("epsilon-underflows-single", spec(epsilon="1.0e-50"), "epsilon", r"single"),
    Case("epsilon-code", spec(epsilon="'1e-5); system(\"id\"); (0'"), "epsilon", r"must be a number"),
    # every output would be the offset: variance + epsilon overflows in single precision
    Case("epsilon-flt-max", spec(epsilon="3.4e38"), "epsilon", r"too large .*overflow to infinity"),
    Case("epsilon-past-half-ulp", spec(epsilon="2e31"), "epsilon", r"below 2\^103"),
    Case("epsilon-huge-double", spec(epsilon="1e300", dtype="double"), "epsilon", r"below 2\^970"),
    # names
    Case("name-leading-digit", spec(name="3layer"), "name", r"C identifier"),
    Case("name-hyphen", spec(name="my-layer"), "name", r"C identifier"),
    Case("name-space", spec(name="'my layer'"), "name", r"C identifier"),
    Case("name-empty", spec(name="''"), "name", r"C identifier"),
    Case("name-unicode", spec(name="caf\u00e9"), "name", r"C identifier"),
    Case("name-newline", spec(name='"a\\nb"'), "name", r"C identifier"),
    Case("name-number", spec(name="123"), "name", r"C identifier string"),
    Case("name-c-keyword", spec(name="int"), "name", r"C/C\+\+ keyword"),
    Case("name-c99-keyword", spec(name="restrict"), "name", r"keyword"),
    Case("name-c11-keyword", spec(name="_Atomic"), "name", r"keyword|reserved"),
    Case("name-cpp-keyword", spec(name="class"), "name", r"keyword"),
    Case("name-cpp-keyword-namespace", spec(name="namespace"), "name", r"keyword"),
    Case("name-reserved-double-underscore", spec(name="__x"), "name", r"reserved"),
    Case("name-reserved-underscore-capital", spec(name="_Foo"), "name", r"reserved"),
    Case("name-too-long", spec(name="a" * 49), "name", r"at most 48"),
    Case("name-std-header", spec(name="math"), "name", r"standard header"),
    Case("name-cuda-header", spec(name="cuda_runtime"), "name", r"shadows"),
    Case("name-code-injection", spec(name="'x(void){system(\"id\");} int y'"), "name", r"C identifier"),
    Case("name-comment-injection", spec(name="'x */ int evil; /*'"), "name", r"C identifier"),
    Case("name-preprocessor-injection", spec(name='"x\\n#include </etc/passwd>"'), "name", r"C identifier"),
    Case("spec-file-name-injection", spec(), "spec", r"control character \\n",
         stem="x\nexecute_process(COMMAND touch PWNED)\n#"),
    Case("spec-file-name-not-utf8", spec(), "spec", r"byte 0xff, which is not UTF-8", stem="lay\udcffer"),
    Case("spec-file-name-bidi", spec(), "spec", r"U\+202E \(RIGHT-TO-LEFT OVERRIDE\)", stem="layer\u202egpj"),
    Case("spec-file-name-isolate", spec(), "spec", r"U\+2069", stem="layer\u2069"),
    Case("spec-file-name-odd-space", spec(), "spec", r"U\+00A0 \(NO-BREAK SPACE\), a space other", stem="lay\u00a0er"),
    Case("stem-not-identifier", spec(drop=("name",)), "name", r"file stem 'bad-stem'", stem="bad-stem"),
    # names whose exported identifiers collide with or are reserved by C, C++ and POSIX
    Case("name-x-ok", spec(name="x"), "name", r"'x' would export macro X_OK, which <unistd\.h> defines"),
    Case("name-r-ok", spec(name="r"), "name", r"macro R_OK, which <unistd\.h>"),
    Case("name-w-ok", spec(name="w"), "name", r"macro W_OK, which <unistd\.h>"),
    Case("name-f-ok", spec(name="F"), "name", r"macro F_OK"),
    Case("name-flt", spec(name="FLT"), "name", r"macro FLT_EPSILON, which <float\.h> defines"),
    Case("name-dbl", spec(name="dbl"), "name", r"macro DBL_EPSILON, which <float\.h>"),
    Case("name-ex-ok", spec(name="ex"), "name", r"macro EX_OK, which <sysexits\.h>"),
    Case("name-underscore", spec(name="_"), "name", r"starts with '_'.*reserved"),
    Case("name-underscore-lower", spec(name="_a"), "name", r"starts with '_'"),
    Case("name-trailing-underscore", spec(name="a_"), "name", r"'__'.*C\+\+"),
    Case("name-inner-double-underscore", spec(name="a__b"), "name", r"'__'"),
    Case("name-signal-family", spec(name="sigma"), "name", r"SIGMA_OK, in the names <signal\.h> reserves"),
    Case("name-string-family", spec(name="strided"), "name", r"function strided_predict, in the names <string\.h>"),
    Case("name-ctype-family", spec(name="isotropic"), "name", r"<ctype\.h> reserves"),
    Case("name-locale-family", spec(name="lc_time"), "name", r"<locale\.h> reserves"),
    Case("name-pthread-family", spec(name="pthread_gn"), "name", r"<pthread\.h> reserves"),
    Case("name-shadows-features", spec(name="features"), "name", r"shadows the standard header <features\.h>"),
    Case("name-shadows-strings", spec(name="strings"), "name", r"<strings\.h>"),
    Case("name-shadows-alloca", spec(name="alloca"), "name", r"<alloca\.h>"),
    Case("name-shadows-endian", spec(name="endian"), "name", r"<endian\.h>"),
    Case("name-shadows-sys", spec(name="sys"), "name", r"shadows"),
    Case("name-shadows-intrinsics", spec(name="xmmintrin"), "name", r"<xmmintrin\.h>"),
    Case("name-support-file", spec(name="semihosting"), "name", r"gncodegen's own semihosting file"),
    Case("stem-reserved-name", spec(drop=("name",)), "name", r"X_OK.*set 'name'", stem="x"),
    # format
    Case("format-bad-label", spec(format="SSXB"), "format", r"label 'X'"),
    Case("format-lower-case", spec(format="sscb"), "format", r"upper case"),
    Case("format-no-channel", spec(format="SSB", input_size="[4, 4]"), "format", r"exactly one C"),
    Case("format-two-channels", spec(format="SCCB"), "format", r"exactly one C"),
    Case("format-two-batches", spec(format="SCBB", input_size="[4, 8]"), "format", r"more than one B"),
    Case("format-two-times", spec(format="CTBT"), "format", r"more than one T"),
    Case("format-four-spatial", spec(format="SSSSCB", input_size="[2, 2, 2, 2, 8]"), "format", r"more than 3 S"),
    Case("format-too-long", spec(format="SSSCBTUUU"), "format", r"at most 8"),
    Case("format-empty", spec(format="''"), "format", r"dimension labels"),
    Case("format-number", spec(format="42"), "format", r"dimension labels"),
    Case("format-injection", spec(format="'SSCB */ int x; /*'"), "format", r"labels are"),
    # sizes
    Case("size-too-few", spec(input_size="[4, 8]"), "input_size", r"has 2 sizes but format 'SSCB' has 3"),
    Case("size-too-many", spec(input_size="[4, 4, 8, 2]"), "input_size", r"has 4 sizes"),
    Case("size-zero", spec(input_size="[0, 4, 8]"), "input_size[0]", r"at least 1"),
    Case("size-negative", spec(input_size="[4, -4, 8]"), "input_size[1]", r"at least 1"),
    Case("size-fraction", spec(input_size="[4.5, 4, 8]"), "input_size[0]", r"must be an integer"),
    Case("size-text", spec(input_size="['4', 4, 8]"), "input_size[0]", r"must be an integer"),
    Case("size-bool", spec(input_size="[true, 4, 8]"), "input_size[0]", r"must be an integer"),
    Case("size-nested", spec(input_size="[[4], 4, 8]"), "input_size[0]", r"must be an integer"),
    Case("size-not-list", spec(input_size="4x4x8"), "input_size", r"list of 3 sizes"),
    Case("size-absurd", spec(input_size="[4, 4, 4294967296]"), "input_size[2]", r"at most"),
    Case("size-huge-integer", spec(input_size="[4, 4, 100000000000000000000000000000]"), "input_size[2]", r"at most"),
    Case("size-numel-overflows-size-t", spec(format="SSSC", num_groups="1",
         input_size="[2147483647, 2147483647, 2147483647, 2147483647]"), "input_size", r"overflow a 64-bit size_t"),
    Case("size-bytes-overflow-size-t", spec(input_size="[2147483647, 2147483647, 8]"), "input_size", r"overflow a 64-bit size_t"),
    # learned parameters
    Case("scale-too-short", spec(scale="[1, 2, 3]"), "scale", r"exactly num_channels=8"),
    Case("offset-too-long", spec(offset="[0, 0, 0, 0, 0, 0, 0, 0, 0]"), "offset", r"exactly num_channels=8"),
    Case("scale-wrong-shape", spec(scale="[[1, 2], [3, 4]]"), "scale", r"exactly num_channels=8"),
    Case("scale-nan", spec(scale="[1, 1, 1, .nan, 1, 1, 1, 1]"), "scale[3]", r"must be finite"),
    Case("offset-inf", spec(offset="[0, 0, 0, 0, 0, 0, 0, -.inf]"), "offset[7]", r"must be finite"),
    Case("scale-text-element", spec(scale="[1, 1, one, 1, 1, 1, 1, 1]"), "scale[2]", r"must be a number"),
    Case("scale-bool-element", spec(scale="[1, 1, 1, 1, true, 1, 1, 1]"), "scale[4]", r"must be a number"),
    Case("scale-overflows-single", spec(scale="[1, 1, 1, 1, 1, 1, 1, 1.0e+39]"), "scale[7]", r"overflows single"),
    Case("scale-bad-type", spec(scale="ones"), "scale", r"list of numbers or \{file"),
    Case("scale-alias-bomb", spec(scale=_laughs(9)), "scale", r"expands to more than 1048576 values"),
    Case("scale-file-unknown-key", spec(scale="{file: s.npy, mode: r}"), "scale.mode", r"unknown key"),
    Case("scale-file-missing", spec(scale="{file: nowhere.npy}"), "scale.file", r"file not found"),
    Case("scale-file-dangling-symlink", spec(scale="{file: gone.npy}"), "scale.file", r"file not found", files=_dangling),
    Case("scale-file-directory", spec(scale="{file: scale.npy}"), "scale.file", r"not a regular file", files=_directory),
    Case("scale-file-fifo", spec(scale="{file: scale.npy}"), "scale.file", r"not a regular file", files=_fifo),
    Case("scale-file-not-named", spec(scale="{key: scale}"), "scale.file", r"must name"),
    Case("scale-file-bad-suffix", spec(scale="{file: scale.txt}"), "scale.file", r"must end in \.npy",
         files=_files(**{"scale.txt": "1 1 1 1 1 1 1 1"})),
    Case("scale-file-corrupt", spec(scale="{file: scale.npy}"), "scale.file", r"cannot read scale\.npy",
         files=_files(**{"scale.npy": b"this is not a numpy file at all"})),
    Case("scale-file-truncated", spec(scale="{file: scale.npy}"), "scale.file", r"cannot read scale\.npy",
         files=_files(**{"scale.npy": npy_bytes(np.ones(8))[:-20]})),
    Case("scale-file-huge-header", spec(scale="{file: scale.npy}"), "scale", r"num_channels=8",
         files=_huge_header),
    Case("scale-file-pickled", spec(scale="{file: scale.npy}"), "scale.file", r"pickled", files=_pickled),
    Case("scale-file-raw-pickle", spec(scale="{file: scale.npy}"), "scale.file", r"cannot read scale\.npy",
         files=_raw_pickle),
    Case("scale-npz-pickled", spec(scale="{file: p.npz, key: scale}"), "scale.file", r"pickled",
         files=_pickled_npz),
    Case("scale-file-strings", spec(scale="{file: scale.npy}"), "scale.file", r"real numbers",
         files=_files(**{"scale.npy": npy_bytes(np.array(["1"] * 8))})),
    Case("scale-file-complex", spec(scale="{file: scale.npy}"), "scale.file", r"real numbers",
         files=_files(**{"scale.npy": npy_bytes(np.ones(8, dtype=complex))})),
    Case("scale-file-wrong-length", spec(scale="{file: scale.npy}"), "scale", r"exactly num_channels=8",
         files=_files(**{"scale.npy": npy_bytes(np.ones(5))})),
    Case("scale-file-nan", spec(scale="{file: scale.npy}"), "scale[2]", r"must be finite",
         files=_files(**{"scale.npy": npy_bytes(np.array([1, 1, np.nan, 1, 1, 1, 1, 1.0]))})),
    Case("scale-file-escapes-folder", spec(scale="{file: ../outside/secret.npy}"), "scale.file",
         r"leaves the spec's folder", files=_outside_npy),
    Case("scale-file-symlink-escapes", spec(scale="{file: link.npy}"), "scale.file",
         r"leaves the spec's folder", files=_symlink_out),
    Case("scale-file-nul", spec(scale='{file: "scale\\0.npy"}'), "scale.file", r"NUL"),
    Case("scale-file-shell-injection", spec(scale="{file: 'x.npy; rm -rf ~; .npy'}"), "scale.file", r"file not found"),
    Case("scale-file-comment-injection", spec(scale="{file: 'x*/ int evil = 1; /*.npy'}"), "scale.file",
         r"\*/", files=_injected_dir),
    Case("npz-key-missing", spec(offset="{file: p.npz}"), "offset.key", r"required for a \.npz",
         files=_files(**{"p.npz": b""})),
    Case("npz-key-absent", spec(offset="{file: p.npz, key: bias}"), "offset.key", r"'bias' not in p\.npz",
         files=lambda w, o: np.savez(w / "p.npz", offset=np.zeros(8))),
    Case("npz-key-comment-injection", spec(offset="{file: p.npz, key: 'k*/ int evil = 1; /*'}"), "offset.key",
         r"\*/", files=_injected_key_npz),
    Case("mat-corrupt", spec(scale="{file: w.mat, var: s}"), "scale.file", r"cannot read w\.mat",
         files=_files(**{"w.mat": b"MATLAB 5.0 MAT-file, but not really"})),
    Case("mat-var-absent", spec(scale="{file: w.mat, var: gamma}"), "scale.var",
         r"'gamma' not in w\.mat \(has beta\)",
         files=lambda w, o: __import__("scipy.io").io.savemat(w / "w.mat", {"beta": np.ones(8)})),
    Case("mat-var-missing", spec(scale="{file: w.mat}"), "scale.var", r"required for a \.mat",
         files=_files(**{"w.mat": b""})),
    Case("npz-that-is-npy", spec(scale="{file: p.npz, key: scale}"), "scale.file",
         r"not a \.npz archive \(it is a \.npy file", files=_files(**{"p.npz": npy_bytes(np.ones(8))})),
    Case("scale-file-name-too-long", spec(scale="{file: " + "x" * 300 + ".npy}"), "scale.file",
         r"longer than 255 bytes"),
    Case("scale-file-path-too-long", spec(scale="{file: " + "d/" * 2100 + "s.npy}"), "scale.file",
         r"longer than 4096 bytes"),
    Case("scale-file-bidi", spec(scale='{file: "s\\u202e.npy"}'), "scale.file",
         r"U\+202E \(RIGHT-TO-LEFT OVERRIDE\)"),
    Case("scale-file-isolate", spec(scale='{file: "s\\u2066x.npy"}'), "scale.file", r"U\+2066"),
    Case("scale-file-zero-width", spec(scale='{file: "s\\u200bx.npy"}'), "scale.file", r"U\+200B"),
    Case("scale-file-line-separator", spec(scale='{file: "s\\u2028x.npy"}'), "scale.file",
         r"line separator"),
    Case("scale-file-trigraph", spec(scale="{file: 'x??/.npy'}"), "scale.file", r"trigraph"),
    Case("npz-key-bidi", spec(offset='{file: p.npz, key: "k\\u2067"}'), "offset.key", r"U\+2067"),
    Case("npz-key-mark", spec(offset='{file: p.npz, key: "k\\u200f"}'), "offset.key", r"U\+200F"),
    Case("mat-var-bidi", spec(scale='{file: w.mat, var: "v\\u061c"}'), "scale.var", r"U\+061C"),
    Case("npy-with-key", spec(scale="{file: scale.npy, key: s}"), "scale", r"drop key",
         files=_files(**{"scale.npy": npy_bytes(np.ones(8))})),
    # keys
    Case("unknown-key-typo", spec(drop=("num_groups",), num_group="4"), "num_group",
         r"unknown key \(did you mean 'num_groups'\?\)"),
    Case("unknown-key-matlab-typo", spec(Epsilom="1e-5"), "Epsilom", r"did you mean 'Epsilon'"),
    Case("unknown-key", spec(colour="red"), "colour", r"unknown key"),
    Case("duplicate-key", spec() + "num_groups: 2\n", "num_groups", r"given twice"),
    Case("duplicate-via-alias", spec(NumGroups="2"), "NumGroups", r"given twice"),
    Case("missing-required", spec(drop=("format",)), "format", r"required key is missing"),
    Case("key-not-string", spec() + "1: 2\n", "1", r"keys must be strings"),
    # YAML itself
    Case("yaml-syntax", spec(input_size="[4, 4, 8"), "spec", r"YAML syntax error at line \d+"),
    Case("yaml-bad-indent", "name: layer\n  num_groups: 4\n", "spec", r"YAML syntax error"),
    Case("yaml-list", "- name: layer\n- num_groups: 4\n", "spec", r"must be a mapping.*got list"),
    Case("yaml-scalar", "42\n", "spec", r"must be a mapping.*got int"),
    Case("yaml-empty", "", "spec", r"got empty"),
    Case("yaml-two-documents", spec() + "---\n" + spec(), "spec", r"one YAML document"),
    Case("yaml-not-utf8", b"name: caf\xe9\n", "spec", r"not UTF-8"),
    Case("yaml-python-object", spec(epsilon=f'!!python/object/apply:os.mkdir ["{MARKER}"]'), "epsilon",
         r"tag .*python/object/apply:os\.mkdir.* not allowed"),
    Case("yaml-python-name", spec(scale_initializer="!!python/name:os.system"), "scale_initializer",
         r"tag .*python/name:os\.system.* not allowed"),
    Case("yaml-python-document", f'!!python/object/apply:os.mkdir ["{MARKER}"]\n', "spec", r"not allowed"),
    Case("yaml-local-tag", spec(epsilon="!eval 1e-5"), "epsilon", r"tag '!eval' at line 5 is not allowed"),
    # YAML 1.2 core schema: no 1.1 surprises
    Case("yaml-leading-zero", spec(num_groups="010"), "num_groups", r"'010' has a leading zero"),
    Case("yaml-leading-zero-in-list", spec(input_size="[4, 04, 8]"), "input_size[1]", r"leading zero"),
    Case("yaml-sexagesimal", spec(input_size="[1:0, 4, 8]"), "input_size[0]", r"must be an integer, got 1:0"),
    Case("yaml-underscore-float", spec(epsilon="1_0e-5"), "epsilon", r"must be a number, got '1_0e-5'"),
    Case("yaml-underscore-int", spec(num_groups="1_0"), "num_groups", r"not a positive integer"),
    Case("yaml-yes-is-a-word", spec(threads="yes"), "threads", r"must be an integer, got yes"),
    Case("yaml-tagged-int-not-int", spec(num_groups="!!int 4.5"), "num_groups", r"not a YAML 1\.2 int"),
    Case("yaml-timestamp-tag", spec(seed="!!timestamp 2001-12-14"), "seed", r"tag '!!timestamp'"),
    Case("yaml-set-tag", spec(scale="!!set {a, b}"), "scale", r"tag '!!set'"),
    Case("yaml-merge-not-mapping", spec() + "<<: 5\n", "<<", r"merge key << takes a mapping"),
    # YAML aliases, nesting and keys: bounded before anything is expanded
    Case("yaml-recursive-alias", spec(scale="&a [*a]"), "scale", r"inside its own anchor"),
    Case("yaml-nested-recursive-alias", spec(scale="&a [1, [2, [*a]]]"), "scale", r"recursive"),
    Case("yaml-recursive-merge", spec() + "extra: &m {<<: *m}\n", "extra.<<", r"recursive"),
    Case("yaml-alias-undefined", spec(scale="*nowhere"), "scale", r"no anchor before it"),
    Case("yaml-bomb-epsilon", spec(epsilon=_laughs(8)), "epsilon", r"expands to more than"),
    Case("yaml-bomb-num-groups", spec(num_groups=_laughs(7)), "num_groups", r"expands to more than"),
    Case("yaml-bomb-format", spec(format=_laughs(7)), "format", r"expands to more than"),
    Case("yaml-bomb-seed", spec(seed=_laughs(7)), "seed", r"expands to more than"),
    Case("yaml-bomb-layout", spec(layout=_laughs(7)), "layout", r"expands to more than"),
    Case("yaml-bomb-name", spec(name=_laughs(7)), "name", r"expands to more than"),
    Case("yaml-bomb-key", spec() + "zzz: " + _laughs(7) + "\n", "zzz", r"expands to more than"),
    # below the limit the value is built, and the message shows a bounded preview of it
    Case("yaml-wide-alias-epsilon", spec(epsilon=_laughs(5)), "epsilon", r"must be a number, got \[\[\[\[\[1, 1, 1"),
    Case("yaml-wide-alias-format", spec(format=_laughs(5)), "format", r"must be a string .*got \[\["),
    Case("yaml-wide-alias-name", spec(name=_laughs(5)), "name", r"must be a C identifier string, got \["),
    Case("yaml-wide-alias-layout", spec(layout=_laughs(5)), "layout", r"must be one of .*got \["),
    Case("yaml-key-list", spec() + "? [a, b]\n: 1\n", "spec", r"the key at line 5 is a list"),
    Case("yaml-key-mapping", spec() + "? {a: 1}\n: 1\n", "spec", r"the key at line 5 is a mapping"),
    Case("yaml-key-alias-of-list", spec(scale=f"&l {ONES8}") + "*l : 1\n", "spec", r"alias of a list"),
    Case("yaml-key-not-string-float", spec() + "1.5: 2\n", "1.5", r"keys must be strings"),
    Case("yaml-nested-40", spec(scale=_nested(40)), "scale", r"nested more than 32 levels deep"),
    Case("yaml-nested-5000", spec(scale=_nested(5000)), "spec", r"nested more than 32 levels deep"),
    Case("yaml-control-character", spec(name='"a\\x01"'), "name", r"C identifier"),
    # initializers
    Case("initializer-code-not-allowed", spec(scale_initializer="gn_evil:init"), "scale_initializer",
         r"--allow-code", files=_evil_module),
    Case("initializer-code-in-dict", spec(offset_initializer="{name: 'os:getcwd', seed: 1}"),
         "offset_initializer", r"--allow-code"),
    Case("initializer-unknown", spec(scale_initializer="uniform"), "scale_initializer", r"is not 'ones'"),
    Case("initializer-injection", spec(scale_initializer="'ones; import os'"), "scale_initializer",
         r"is not 'ones'"),
    Case("initializer-dict-unknown-key", spec(scale_initializer="{name: ones, mean: 3}"),
         "scale_initializer.mean", r"unknown key"),
    # other properties
    Case("layout-unknown", spec(layout="diagonal"), "layout", r"not one of column-major, row-major"),
    Case("layout-typo", spec(layout="row-majr"), "layout", r"did you mean 'row-major'"),
    Case("dtype-unknown", spec(dtype="int8"), "dtype", r"not one of"),
    Case("dtype-not-on-target", spec(dtype="half"), "dtype", r"half is not available on the c target"),
    Case("factor-negative", spec(scale_learn_rate_factor="-1"), "scale_learn_rate_factor", r"non-negative"),
    Case("factor-text", spec(OffsetL2Factor="lots"), "OffsetL2Factor", r"must be a number"),
    Case("seed-negative", spec(seed="-1"), "seed", r"at least 0"),
    Case("threads-zero", spec(threads="0"), "threads", r"at least 1"),
    Case("threads-absurd", spec(threads="100000"), "threads", r"at most 256"),
    Case("cuda-arch-unknown", spec(cuda_arch="[77]"), "cuda_arch[0]", r"not a known compute capability"),
    # several layers
    Case("layers-not-list", "layers: {name: a}\n", "layers", r"non-empty list"),
    Case("layers-empty", "layers: []\n", "layers", r"non-empty list"),
    Case("layers-item-not-mapping", "layers: [1, 2]\n", "layers[0]", r"must be a mapping"),
    Case("layers-with-top-level-key", "epsilon: 1e-3\n" + TWO_LAYERS.format(a="a", b="b", g=2),
         "epsilon", r"not allowed beside 'layers'"),
    Case("layers-duplicate-names", TWO_LAYERS.format(a="same", b="same", g=2), "layers[1].name",
         r"'same' is used by an earlier layer"),
    Case("layers-names-differ-in-case", TWO_LAYERS.format(a="enc", b="ENC", g=2), "layers[1].name",
         r"same macro prefix"),
    Case("layers-name-clashes-cuda-header", TWO_LAYERS.format(a="enc", b="enc_cuda", g=2),
         "layers[1].name", r"enc_cuda\.h would clash with enc's CUDA header"),
    Case("layers-name-clashes-harness", TWO_LAYERS.format(a="gen_harness", b="gen", g=2),
         "layers[1].name", r"gen_harness\.h would clash with gen's test harness"),
    Case("layers-inner-error", TWO_LAYERS.format(a="a", b="b", g=3), "layers[1].num_groups",
         r"3 does not divide num_channels 4"),
    Case("layers-default-names-bad-stem", "layers:\n  - num_groups: 1\n    format: CB\n    input_size: [4]\n",
         "layers[0].name", r"file stem", stem="bad-stem"),
]

assert len({c.id for c in CASES}) == len(CASES), "case ids must be distinct"


# --------------------------------------------------------------------------- harness


def _snapshot(root: Path) -> dict[str, tuple]:
    """Return every entry under root: kind and content (bytes, link target) and mode."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            st = p.lstat()
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir", st.st_mode)
            elif p.is_file():
                out[rel] = ("file", st.st_mode, p.read_bytes(), st.st_mtime_ns)
            else:
                out[rel] = ("other", st.st_mode)
    return out


@pytest.fixture(scope="module")
def good_output(tmp_path_factory) -> Path:
    """Return an output folder written by a good `gncodegen build` (our own files)."""
    root = tmp_path_factory.mktemp("good")
    (root / "layer.yaml").write_text(spec())
    env = {**os.environ, "GNCODEGEN_CACHE": str(root / "cache")}
    proc = subprocess.run([*CLI, "build", "layer.yaml", "-o", "out", "--no-verify"], cwd=root,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (root / "out").iterdir()) == [
        "CMakeLists.txt", "layer.c", "layer.h", "manifest.json", "report.html"]
    return root / "out"


def run_cli(args: list[str], cwd: Path, cache: Path) -> subprocess.CompletedProcess:
    """Run the gncodegen CLI in a subprocess and return the completed process."""
    env = {**os.environ, "GNCODEGEN_CACHE": str(cache), "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([*CLI, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


def check_rejected(proc: subprocess.CompletedProcess, field: str, rule: str) -> None:
    """Assert the CLI refused a spec with exit 2 and one line `error: <field>: <rule>`."""
    output = proc.stdout + proc.stderr
    assert "Traceback" not in output, output
    assert proc.returncode == 2, output
    assert proc.stdout == "", proc.stdout
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    prefix = f"error: {field}: "
    assert lines[0].startswith(prefix), f"expected {prefix!r}...; got {lines[0]!r}"
    assert re.search(rule, lines[0][len(prefix):]), f"rule {rule!r} not in {lines[0]!r}"
    assert len(lines[0]) < 400, "a one-line message a person can read"


def prepare(case: Case, root: Path, good_output: Path) -> Path:
    """Lay out the case's folders under root and return the spec folder (the CLI's cwd)."""
    work, outside = root / "work", root / "outside"
    work.mkdir()
    outside.mkdir()
    (root / "cache").mkdir()
    shutil.copytree(good_output, work / "generated" / case.stem)
    spec_path = work / f"{case.stem}.yaml"
    if isinstance(case.text, bytes):
        spec_path.write_bytes(case.text)
    else:
        spec_path.write_text(case.text)
    if case.files:
        case.files(work, outside)
    return work


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_spec_is_refused_and_nothing_changes(case: Case, tmp_path: Path, good_output: Path):
    """A bad spec: exit 2, one line naming the field, nothing written, no payload run."""
    work = prepare(case, tmp_path, good_output)
    before = _snapshot(tmp_path)
    # No -o: the default output folder generated/<stem>/ exists and must stay as it was.
    proc = run_cli(["build", f"{case.stem}.yaml"], cwd=work, cache=tmp_path / "cache")
    check_rejected(proc, case.field, case.rule)
    assert not (tmp_path / MARKER).exists(), "the spec ran code"
    assert _snapshot(tmp_path) == before


SOME = ["groups-not-dividing", "epsilon-nan", "name-c-keyword", "scale-file-pickled",
        "yaml-python-object", "unknown-key-typo", "layers-duplicate-names"]


@pytest.mark.parametrize("command", ["verify", "show"])
@pytest.mark.parametrize("case", [c for c in CASES if c.id in SOME],
                         ids=[c.id for c in CASES if c.id in SOME])
def test_other_commands_refuse_alike(case: Case, command: str, tmp_path: Path,
                                     good_output: Path):
    """`verify` and `show` refuse a bad spec with the same one-line error and status."""
    work = prepare(case, tmp_path, good_output)
    before = _snapshot(tmp_path)
    proc = run_cli([command, f"{case.stem}.yaml"], cwd=work, cache=tmp_path / "cache")
    check_rejected(proc, case.field, case.rule)
    assert not (tmp_path / MARKER).exists()
    assert _snapshot(tmp_path) == before


def test_explicit_output_folder_untouched(tmp_path: Path, good_output: Path):
    """With -o naming an existing folder of ours, a bad spec leaves it byte-identical."""
    case = next(c for c in CASES if c.id == "groups-not-dividing")
    work = prepare(case, tmp_path, good_output)
    out = tmp_path / "elsewhere" / "out"
    shutil.copytree(good_output, out)
    before = _snapshot(tmp_path)
    proc = run_cli(["build", "layer.yaml", "-o", str(out)], cwd=work, cache=tmp_path / "cache")
    check_rejected(proc, case.field, case.rule)
    assert _snapshot(tmp_path) == before


def test_missing_spec_file(tmp_path: Path):
    """A spec path that does not exist: exit 2, `error: spec: file not found`."""
    (tmp_path / "cache").mkdir()
    proc = run_cli(["build", "absent.yaml"], cwd=tmp_path, cache=tmp_path / "cache")
    check_rejected(proc, "spec", r"file not found")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


def test_code_initializer_runs_only_when_allowed(tmp_path: Path, good_output: Path):
    """The refused initializer case is a real one: with --allow-code the same spec builds."""
    case = next(c for c in CASES if c.id == "initializer-code-not-allowed")
    work = prepare(case, tmp_path, good_output)
    env_path = f"{work}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    env = {**os.environ, "GNCODEGEN_CACHE": str(tmp_path / "cache"), "PYTHONPATH": env_path}
    proc = subprocess.run([*CLI, "show", "layer.yaml", "--allow-code"], cwd=work, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "gn_evil:init" in proc.stdout
    assert (tmp_path / MARKER).is_dir()   # so the refusal above is what kept it from running


def test_case_count():
    """The table keeps at least 40 distinct bad specs."""
    assert len(CASES) >= 40
