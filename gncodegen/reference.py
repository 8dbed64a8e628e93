"""The float64 NumPy reference: group normalization on flat buffers in a spec's memory layout.

It works group by group on views of the caller's buffer and a chunk of a group at a time, so
it needs a few chunks beside the input and the output (or the buffer it is compared with),
whatever the size of an observation.
"""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np

from .spec import Layer

# Elements of a group converted to float64 at a time.
CHUNK = 1 << 20


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


def group_indices(layer: Layer, batch: int) -> Iterator[tuple[int, tuple]]:
    """Yield (first channel, index) of every (observation, group) into the logical array."""
    fmt = layer.format
    cpg = layer.channels_per_group
    for n in range(batch if "B" in fmt else 1):
        for g in range(layer.num_groups):
            idx = [slice(None)] * len(fmt)
            if "B" in fmt:
                idx[fmt.index("B")] = n
            idx[fmt.index("C")] = slice(g * cpg, (g + 1) * cpg)
            yield g * cpg, tuple(idx)


def group_channel_axis(layer: Layer) -> int:
    """Return the channel axis among a group view's axes (group_indices indexes B away)."""
    fmt = layer.format
    return fmt.index("C") - (1 if "B" in fmt and fmt.index("B") < fmt.index("C") else 0)


def _chunks(view: np.ndarray, params: tuple[np.ndarray, ...]) -> Iterator[tuple]:
    """Yield (chunk, chunk's params) pieces of a group view of at most CHUNK elements each.

    params are arrays that broadcast against the view (per-channel scale and offset); they are
    cut alike wherever their extent along the cut axis is not 1.
    """
    if view.size <= CHUNK or view.ndim == 0:
        yield view, params
        return
    axis = next((a for a in range(view.ndim) if view.shape[a] > 1), 0)
    step = max(1, view.shape[axis] * CHUNK // view.size)
    for start in range(0, view.shape[axis], step):
        cut = [slice(None)] * view.ndim
        cut[axis] = slice(start, start + step)
        cut_t = tuple(cut)
        yield from _chunks(view[cut_t], tuple(p[cut_t] if p.shape[axis] > 1 else p
                                               for p in params))


def _sum(chunks) -> float:
    """Return the sum of every element of the chunks, correctly rounded across chunks (a NaN
    or infinities of both signs give NaN, as a plain sum would)."""
    parts = [float(np.sum(c, dtype=np.float64)) for c in chunks]
    return math.fsum(parts) if all(math.isfinite(p) for p in parts) else sum(parts)


def skip_sum(x: np.ndarray, skip: np.ndarray, storage: np.dtype) -> np.ndarray:
    """Return x + skip as the layer sees it: the exact sum rounded once to the storage type
    (what an unfused add in that type gives), as a new array of that type."""
    out = np.empty(np.size(x), dtype=storage)
    flat_x, flat_k = np.ravel(x), np.ravel(skip)
    for start in range(0, out.size, CHUNK):
        stop = start + CHUNK
        out[start:stop] = (flat_x[start:stop].astype(np.float64)
                           + flat_k[start:stop].astype(np.float64))
    return out


def reference_pieces(x: np.ndarray, layer: Layer, batch: int, scale=None, offset=None,
                     like: np.ndarray | None = None, ada_scale=None, ada_shift=None
                     ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (piece of like, the reference's float64 values for it) over every element.

    like is a flat buffer in the layer's layout (the output to fill, or one to compare); the
    pieces are views of it, a group or a chunk of one at a time, so the reference never holds
    more than a chunk in float64 beside the caller's buffers.

    Each group's statistics take three passes in float64, relative to its first element (its
    pilot: x - pilot is exact for inputs of a narrower type, so a mean far from zero costs no
    precision, which subtracting a rounded float64 mean would, about 1e-12 at mean 1e4): the
    mean of x - pilot, a refinement of it, then the biased variance, as MATLAB, ONNX and
    PyTorch define it. scale and offset default to the layer's own parameters. An adaptive
    layer's z = scale*x^ + offset becomes z*(1 + ada_scale[n, c]) + ada_shift[n, c] (flat
    batch x channels arrays) before the activation; a skip layer's x is already x + skip
    (skip_sum).
    """
    scale = np.asarray(layer.scale if scale is None else scale, dtype=np.float64)
    offset = np.asarray(layer.offset if offset is None else offset, dtype=np.float64)
    src = to_logical(np.asarray(x), layer, batch)
    dst = to_logical(np.empty(src.size) if like is None else np.ravel(like), layer, batch)
    c_axis = group_channel_axis(layer)
    cpg = layer.channels_per_group
    if layer.adaptive:
        gains = 1.0 + np.asarray(ada_scale, dtype=np.float64).reshape(-1, layer.num_channels)
        shifts = np.asarray(ada_shift, dtype=np.float64).reshape(-1, layer.num_channels)
    for k, (c0, idx) in enumerate(group_indices(layer, batch)):
        view, target = src[idx], dst[idx]
        shape = [1] * view.ndim
        shape[c_axis] = cpg
        s, o = scale[c0:c0 + cpg].reshape(shape), offset[c0:c0 + cpg].reshape(shape)
        if layer.adaptive:
            # z*g + h = scale*g*x^ + (offset*g + h), in float64 as exactly as z itself
            n = k // layer.num_groups
            g = gains[n, c0:c0 + cpg].reshape(shape)
            s, o = s * g, o * g + shifts[n, c0:c0 + cpg].reshape(shape)
        n = view.size
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            pilot = np.float64(view[(0,) * view.ndim])

            def shifted(chunk):
                return chunk.astype(np.float64) - pilot

            m1 = _sum(shifted(c) for c, _ in _chunks(view, ())) / n
            m2 = _sum(shifted(c) - m1 for c, _ in _chunks(view, ())) / n
            var = _sum(np.square((shifted(c) - m1) - m2) for c, _ in _chunks(view, ())) / n
            rstd = 1.0 / np.sqrt(np.float64(var) + layer.epsilon)
            pieces = zip(_chunks(view, (s, o)), _chunks(target, ()))
            for (c, (cs, co)), (t, _) in pieces:
                yield t, layer.activation.apply(((shifted(c) - m1) - m2) * rstd * cs + co)


def group_norm_reference(x: np.ndarray, layer: Layer, batch: int,
                         scale=None, offset=None, skip=None, ada_scale=None,
                         ada_shift=None) -> np.ndarray:
    """Return y = group_norm(x) in float64 for a flat buffer in the layer's layout (see
    reference_pieces for how it is computed), with the layer's fusions."""
    out = np.empty(np.size(x), dtype=np.float64)
    if layer.skip:
        from .dtypes import dtype
        x = skip_sum(x, skip, dtype(layer.dtype).numpy)
    for piece, values in reference_pieces(x, layer, batch, scale, offset, like=out,
                                          ada_scale=ada_scale, ada_shift=ada_shift):
        piece[...] = values
    return out
