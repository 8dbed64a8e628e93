"""The activations a layer fuses after its normalization (MATLAB's activation layers).

Each is data: its name and MATLAB's layer name, the properties it takes (MATLAB's names as
aliases), the float64 function the reference applies, and the math functions the generated
code calls for it. The templates print the C from `kind` and the values (common/activation.j2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import SpecError
from .fields import parse_number
from .text import preview

# name -> (MATLAB layer, {property: (MATLAB name, default or None when required)})
KINDS: dict[str, tuple[str, dict[str, tuple[str, Any]]]] = {
    "none": ("", {}),
    "relu": ("reluLayer", {}),
    "leaky-relu": ("leakyReluLayer", {"scale": ("Scale", 0.01)}),
    "clipped-relu": ("clippedReluLayer", {"ceiling": ("Ceiling", None)}),
    "elu": ("eluLayer", {"alpha": ("Alpha", 1.0)}),
    "gelu": ("geluLayer", {"approximation": ("Approximation", "none")}),
    "swish": ("swishLayer", {}),
    "sigmoid": ("sigmoidLayer", {}),
    "tanh": ("tanhLayer", {}),
}
_BY_NAME = {**{k: k for k in KINDS}, **{v[0].lower(): k for k, v in KINDS.items() if v[0]},
            "silu": "swish", "leakyrelu": "leaky-relu", "clippedrelu": "clipped-relu"}
# The math functions each kind calls (without the precision's suffix): what the firmware
# footprint allows the object beyond the square root.
LIBM = {"elu": ("expm1",), "swish": ("exp",), "sigmoid": ("exp",), "tanh": ("tanh",)}
GELU_LIBM = {"none": ("erf",), "tanh": ("tanh",)}


@dataclass(frozen=True)
class Activation:
    """One fused activation and its properties (0 / "" where the kind has none)."""

    kind: str = "none"
    scale: float = 0.0            # leaky-relu: the slope below 0
    ceiling: float = 0.0          # clipped-relu: the most it passes
    alpha: float = 0.0            # elu: the saturation below 0
    approximation: str = ""       # gelu: none (erf) or tanh

    @property
    def fused(self) -> bool:
        """True when the layer applies an activation."""
        return self.kind != "none"

    @property
    def libm(self) -> tuple[str, ...]:
        """The math functions the generated code calls for it (exp, expm1, erf, tanh)."""
        if self.kind == "gelu":
            return GELU_LIBM[self.approximation]
        return LIBM.get(self.kind, ())

    def describe(self) -> str:
        """The activation in words, for the plan comment."""
        props = {"leaky-relu": f"scale {self.scale!r}", "clipped-relu": f"ceiling {self.ceiling!r}",
                 "elu": f"alpha {self.alpha!r}", "gelu": f"approximation {self.approximation}"}
        return self.kind + (f" ({props[self.kind]})" if self.kind in props else "")

    def apply(self, z: np.ndarray) -> np.ndarray:
        """Return the activation of z in float64 (NaN stays NaN), as the reference applies it."""
        k = self.kind
        if k == "none":
            return z
        with np.errstate(over="ignore", invalid="ignore"):
            if k == "relu":
                return np.where(z < 0, 0.0, z)
            if k == "leaky-relu":
                return np.where(z < 0, self.scale * z, z)
            if k == "clipped-relu":
                return np.where(z < 0, 0.0, np.where(z > self.ceiling, self.ceiling, z))
            if k == "elu":
                return np.where(z < 0, self.alpha * np.expm1(np.minimum(z, 0.0)), z)
            if k == "sigmoid":
                return _sigmoid(z)
            if k == "swish":
                return z * _sigmoid(z)
            if k == "tanh":
                return np.tanh(z)
            if k == "gelu" and self.approximation == "tanh":
                return 0.5 * z * (1.0 + np.tanh(math.sqrt(2.0 / math.pi)
                                                * (z + 0.044715 * z * z * z)))
            return 0.5 * z * (1.0 + _erf(z / math.sqrt(2.0)))

    def derivative(self, z: np.ndarray) -> np.ndarray:
        """Return d activation / dz at z in float64, as the backward pass applies it.

        At the breakpoints it takes PyTorch's autograd conventions: relu's slope at 0 is 0,
        leaky-relu's is its scale, clipped-relu's is 0 at 0 and at the ceiling, elu's is alpha.
        """
        k = self.kind
        z = np.asarray(z, dtype=np.float64)
        if k == "none":
            return np.ones_like(z)
        with np.errstate(over="ignore", invalid="ignore"):
            if k == "relu":
                return np.where(z > 0, 1.0, 0.0)
            if k == "leaky-relu":
                return np.where(z > 0, 1.0, self.scale)
            if k == "clipped-relu":
                return np.where((z > 0) & (z < self.ceiling), 1.0, 0.0)
            if k == "elu":
                return np.where(z > 0, 1.0, self.alpha * np.exp(np.minimum(z, 0.0)))
            if k == "sigmoid":
                s = _sigmoid(z)
                return s * (1.0 - s)
            if k == "swish":
                s = _sigmoid(z)
                return s * (1.0 + z * (1.0 - s))
            if k == "tanh":
                t = np.tanh(z)
                return 1.0 - t * t
            if k == "gelu" and self.approximation == "tanh":
                k0, k1 = math.sqrt(2.0 / math.pi), 0.044715
                t = np.tanh(k0 * (z + k1 * z * z * z))
                return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * k0 * (1.0 + 3.0 * k1 * z * z)
            cdf = 0.5 * (1.0 + _erf(z / math.sqrt(2.0)))
            pdf = np.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
            return cdf + z * pdf


def _sigmoid(z: np.ndarray) -> np.ndarray:
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def _erf(v: np.ndarray) -> np.ndarray:
    return np.vectorize(math.erf, otypes=[np.float64])(v) if np.size(v) else np.asarray(v)


NONE = Activation()


def parse_activation(value: Any, fld: str) -> Activation:
    """Return the activation a spec names: a name (MATLAB's layer names too) or a mapping with
    `type` and the kind's properties (MATLAB's property names too)."""
    if value is None:
        return NONE
    props: dict = {}
    if isinstance(value, dict):
        props = dict(value)
        name = props.pop("type", props.pop("Type", None))
        if name is None:
            raise SpecError(fld, f"a mapping needs `type` (one of {', '.join(KINDS)}), got "
                                 f"{preview(value)}")
    else:
        name = value
    if not isinstance(name, str) or name.lower() not in _BY_NAME:
        raise SpecError(fld if not props else f"{fld}.type",
                        f"'{preview(name)}' is not an activation; choose from "
                        f"{', '.join(KINDS)} (or MATLAB's reluLayer, swishLayer, ...)")
    kind = _BY_NAME[name.lower()]
    known = KINDS[kind][1]
    by_alias = {alias.lower(): key for key, (alias, _) in known.items()}
    by_alias.update({key: key for key in known})
    values: dict[str, Any] = {}
    for key, given in props.items():
        canon = by_alias.get(str(key).lower()) if isinstance(key, str) else None
        if canon is None:
            takes = ", ".join(known) or "no properties"
            raise SpecError(f"{fld}.{key}", f"{kind} takes {takes}")
        values[canon] = given
    out: dict[str, Any] = {}
    for key, (_, default) in known.items():
        sub = f"{fld}.{key}"
        if key not in values and default is None:
            raise SpecError(sub, f"{kind} needs its {key} (MATLAB's {known[key][0]})")
        given = values.get(key, default)
        if key == "approximation":
            if not isinstance(given, str) or given.lower() not in ("none", "tanh"):
                raise SpecError(sub, f"must be none or tanh, got {preview(given)}")
            out[key] = given.lower()
        else:
            number = parse_number(given, sub, positive=False)
            if key == "ceiling" and not number > 0:
                raise SpecError(sub, f"must be positive, got {preview(given)}")
            if key == "alpha" and number < 0:
                raise SpecError(sub, f"must not be negative, got {preview(given)}")
            out[key] = number
    return Activation(kind, **out)


def literals(act: Activation, acc: str) -> dict[str, str]:
    """Return the constants the activation's C uses, as literals of the accumulation type
    (acc: single or double), for common/activation.j2."""
    from .dtypes import c_literal

    values = {"zero": 0.0, "one": 1.0, "half": 0.5, "scale": act.scale, "ceiling": act.ceiling,
              "alpha": act.alpha, "gelu_k0": math.sqrt(2.0 / math.pi), "gelu_k1": 0.044715,
              "inv_sqrt2": 1.0 / math.sqrt(2.0), "inv_sqrt_2pi": 1.0 / math.sqrt(2.0 * math.pi)}
    return {k: c_literal(v, acc) for k, v in values.items()}
