"""One record per dtype: what every part of gncodegen needs to know about a number type.

The spec names a dtype (`single`, `double`, `half`, `bfloat16`); everything that depends on it
reads its record here: the NumPy type that holds it on the host, its size, the type its sums
accumulate in, its largest value, the verification tolerance, the exponent of the overflow
rescue, how values round to it and how a value is spelled as a C-family literal. How a target
spells the storage type (`__half` in CUDA, `half` in OpenCL) is that target's own data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import ml_dtypes
import numpy as np


@dataclass(frozen=True)
class Spelling:
    """How C-family code (C, CUDA, OpenCL C) computes in an accumulation type."""

    ctype: str            # float, double
    suffix: str           # literal suffix: f, ''
    sqrt: str             # square root on ctype
    fma: str              # fused multiply-add on ctype
    fast_fma_macro: str   # the <math.h> macro that says fma is one instruction
    max_macro: str        # the <float.h> macro of the largest finite value


@dataclass(frozen=True)
class DType:
    """One number type a layer can compute in."""

    name: str                  # as the spec spells it
    numpy: np.dtype            # the host type holding it (ml_dtypes for bfloat16)
    acc: str                   # the dtype its sums accumulate in: single or double
    tolerance: float           # max |y - reference| relative to max |reference|
    big_mean: float            # mean of the "large mean, std 1" verification case
    rescue_exponent: int       # accumulation types: d scaled by 2^-e when the squares overflow

    def rescue_exponent_for(self, numel: int) -> int:
        """Return e for a group of numel elements: the type's own e (enough up to 2^28
        elements), or more where numel squares of |d| * 2^-e <= 2 * largest * 2^-e could still
        reach half the largest accumulator (single precision past 2^28 elements)."""
        acc = DTYPES[self.acc]
        need = 3 + 2 * math.log2(self.largest) + math.log2(max(numel, 1)) - math.log2(acc.largest)
        return max(self.rescue_exponent, math.ceil(need / 2))

    @property
    def bytes(self) -> int:
        """Bytes of one element in memory."""
        return self.numpy.itemsize

    @property
    def largest(self) -> float:
        """The largest finite value of the storage type."""
        return float(_finfo(self.numpy).max)

    @property
    def smallest_normal(self) -> float:
        """The smallest positive normal value of the storage type."""
        return float(_finfo(self.numpy).smallest_normal)

    @property
    def accumulator(self) -> DType:
        """The record of the type its sums accumulate in."""
        return DTYPES[self.acc]

    @property
    def spelling(self) -> Spelling:
        """C-family spelling of the accumulation type."""
        return SPELLINGS[self.acc]

    def round(self, values) -> np.ndarray:
        """Return values as float64 after rounding them to the storage type."""
        arr = np.asarray(values, dtype=np.float64)
        return arr.astype(self.numpy).astype(np.float64)

    def literal(self, value: float) -> str:
        """Return a C-family literal that reads back as value rounded to the accumulation type."""
        return c_literal(value, self.acc)

    def pow2_literal(self, exponent: int) -> str:
        """Return 2^exponent as a C99 hexadecimal literal of the accumulation type: 0x1p-80f."""
        return f"0x1p{exponent}{self.spelling.suffix}"


def _finfo(dt: np.dtype):
    return ml_dtypes.finfo(dt) if dt == np.dtype(ml_dtypes.bfloat16) else np.finfo(dt)


SPELLINGS = {
    "single": Spelling("float", "f", "sqrtf", "fmaf", "FP_FAST_FMAF", "FLT_MAX"),
    "double": Spelling("double", "", "sqrt", "fma", "FP_FAST_FMA", "DBL_MAX"),
}

# Rescue exponents: with |d| <= 2 * the largest value, (d * 2^-e)^2 summed over 2^28 elements
# stays below the largest value, and a variance that overflowed stays a normal number once
# scaled by 2^-2e (single: 2^-80; double: 2^-560).
DTYPES: dict[str, DType] = {
    d.name: d for d in (
        DType("single", np.dtype(np.float32), "single", 1e-5, 1e4, 80),
        DType("double", np.dtype(np.float64), "double", 1e-12, 1e4, 560),
        DType("half", np.dtype(np.float16), "single", 1e-2, 1e3, 80),
        DType("bfloat16", np.dtype(ml_dtypes.bfloat16), "single", 5e-2, 1e2, 80),
    )
}


def dtype(name: str) -> DType:
    """Return the record of a dtype the spec names."""
    return DTYPES[name]


def _with_point(text: str) -> str:
    """Return a number's shortest text with a decimal point, so C reads it as floating (1 ->
    1.0, 1e-05 -> 1.0e-05)."""
    if "e" not in text:
        return text if "." in text else text + ".0"
    mant, exp = text.split("e")
    return text if "." in mant else f"{mant}.0e{exp}"


def c_literal(value: float, acc: str) -> str:
    """Return a C literal that reads back as exactly value rounded to acc (single or double)."""
    if acc == "double":
        v = float(value)
        text = repr(v)
    else:
        v = np.float32(value)
        text = str(v)  # numpy prints the shortest string that round-trips in float32
    if not math.isfinite(float(v)):
        raise ValueError(f"literal {value!r} is not finite in {acc}")
    text = _with_point(text)
    assert (float(text) if acc == "double" else np.float32(float(text))) == v, (text, value)
    return text + SPELLINGS[acc].suffix


def round_to_dtype(values, name: str) -> np.ndarray:
    """Return values as float64 after rounding them to the named dtype's storage type."""
    return DTYPES[name].round(values)


def c_literals(values, acc: str) -> tuple[str, ...]:
    """Return c_literal of every value, fast for many: each distinct value is spelled once,
    and the round trip is checked on the whole array at once (a million channels take a second,
    not ten)."""
    arr = np.asarray(values, dtype=np.float64).ravel()
    if arr.size == 0:
        return ()
    rounded = arr if acc == "double" else arr.astype(np.float32)
    if not np.all(np.isfinite(rounded)):
        bad = arr[~np.isfinite(rounded)][0]
        raise ValueError(f"literal {bad!r} is not finite in {acc}")
    # Distinct by bit pattern, so that -0.0 keeps its sign.
    bits, where = np.unique(rounded.view(np.uint64 if acc == "double" else np.uint32),
                            return_inverse=True)
    distinct = bits.view(rounded.dtype)
    spell = repr if acc == "double" else str   # both print the shortest round-trip text
    texts = [_with_point(t) for t in map(spell, distinct.tolist() if acc == "double"
                                          else distinct)]
    back = np.array([float(t) for t in texts])
    if acc != "double":
        back = back.astype(np.float32)
    assert np.array_equal(back.view(bits.dtype), bits), "a literal does not read back as its value"
    suffix = SPELLINGS[acc].suffix
    spelled = [t + suffix for t in texts]
    return tuple(spelled[i] for i in where.ravel())
