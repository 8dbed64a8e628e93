"""The float64 NumPy reference: group normalization on flat buffers in a spec's memory layout."""

from __future__ import annotations

import numpy as np

from .spec import Layer


def logical_shape(layer: Layer, batch: int) -> tuple[int, ...]:
    """Return the tensor's shape in format-letter order, B taking the batch count."""
    return tuple(batch if size is None else size for _, size in layer.dims())


def _order(layer: Layer) -> str:
    return "F" if layer.layout == "column-major" else "C"


def to_logical(flat: np.ndarray, layer: Layer, batch: int) -> np.ndarray:
    """Return a view of a flat buffer as an array indexed in format-letter order."""
    return np.reshape(flat, logical_shape(layer, batch), order=_order(layer))


def to_flat(arr: np.ndarray, layer: Layer) -> np.ndarray:
    """Return a format-order array flattened into the layer's memory layout."""
    return np.ravel(arr, order=_order(layer))


def canonical(arr: np.ndarray, layer: Layer) -> np.ndarray:
    """Return a format-order array as (batch, channels, reduced) with reduced flattened."""
    fmt = layer.format
    b_axis = [fmt.index("B")] if "B" in fmt else []
    c_axis = fmt.index("C")
    reduced = [i for i, ch in enumerate(fmt) if ch not in "BC"]
    moved = np.transpose(arr, b_axis + [c_axis] + reduced)
    if not b_axis:
        moved = moved[np.newaxis]
    return moved.reshape(moved.shape[0], moved.shape[1], -1)


def from_canonical(canon: np.ndarray, layer: Layer, batch: int) -> np.ndarray:
    """Return the inverse of canonical(): a format-order array."""
    fmt = layer.format
    b_axis = [fmt.index("B")] if "B" in fmt else []
    c_axis = fmt.index("C")
    reduced = [i for i, ch in enumerate(fmt) if ch not in "BC"]
    shape = logical_shape(layer, batch)
    perm = b_axis + [c_axis] + reduced
    moved_shape = tuple(shape[i] for i in perm)
    moved = canon.reshape(moved_shape if b_axis else (1, *moved_shape))
    if not b_axis:
        moved = moved[0]
    return np.transpose(moved, np.argsort(perm))


def group_norm_reference(x: np.ndarray, layer: Layer, batch: int,
                         scale=None, offset=None) -> np.ndarray:
    """Return y = group_norm(x) in float64 for a flat buffer in the layer's layout.

    Statistics use two passes around a pilot (a refined mean, then the mean of squared
    deviations); the variance is biased, as in MATLAB, ONNX and PyTorch.
    scale and offset default to the layer's own parameters.
    """
    g = layer.num_groups
    scale = np.asarray(layer.scale if scale is None else scale, dtype=np.float64)
    offset = np.asarray(layer.offset if offset is None else offset, dtype=np.float64)
    x64 = np.asarray(x, dtype=np.float64)
    canon = canonical(to_logical(x64, layer, batch), layer)          # (N, C, R)
    n, c, r = canon.shape
    grouped = canon.reshape(n, g, (c // g) * r)
    with np.errstate(invalid="ignore", over="ignore"):
        # Work relative to the group's first element: x - pilot is exact for inputs of a
        # narrower type, so a mean far from zero (1e4 with std 1) costs no precision, which
        # subtracting a rounded float64 mean would (about 1e-12 there).
        pilot = grouped[:, :, :1]
        shifted = grouped - pilot
        dev = shifted - shifted.mean(axis=2, keepdims=True)
        dev = dev - dev.mean(axis=2, keepdims=True)   # one refinement of the mean
        var = (dev ** 2).mean(axis=2, keepdims=True)
        normalized = (dev / np.sqrt(var + layer.epsilon)).reshape(n, c, r)
        out = normalized * scale[None, :, None] + offset[None, :, None]
    return to_flat(from_canonical(out, layer, batch), layer)
