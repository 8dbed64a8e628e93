"""The float64 NumPy reference for training: the statistics the forward pass keeps, the
backward pass, and MATLAB's solvers (sgdmupdate, adamupdate, rmspropupdate) on scale and offset.

The backward pass differentiates what gncodegen.reference computes, per element of
observation n and channel c::

    v     = x                  (x + skip rounded once to the storage type on a skip layer)
    x^    = (v - mean) * rstd  (mean and rstd = 1/sqrt(biased var + epsilon) per group)
    z0    = scale[c] * x^ + offset[c]
    z     = z0 * (1 + ada_scale[n, c]) + ada_shift[n, c]   (adaptive; else z = z0)
    y     = activation(z)

It works on whole tensors in float64 (a few copies of the input), in the (observation,
channel, reduced) order of gncodegen.reference.canonical; every buffer in and out is flat in
the layer's memory layout, as the generated code takes them.
"""

from __future__ import annotations

import numpy as np

from .reference import canonical, from_canonical, skip_sum, to_flat, to_logical
from .spec import Layer


def _observations(layer: Layer, batch: int) -> int:
    """Return the observations a buffer of `batch` holds (a format without B holds one)."""
    return batch if layer.has_batch else 1


def _canon(flat: np.ndarray, layer: Layer, batch: int) -> np.ndarray:
    """Return a flat buffer in the layer's layout as a float64 (observation, channel,
    reduced) array."""
    logical = to_logical(np.asarray(flat), layer, batch)
    return np.ascontiguousarray(canonical(logical, layer), dtype=np.float64)


def _flat(canon: np.ndarray, layer: Layer, batch: int) -> np.ndarray:
    """Return the inverse of _canon: a flat float64 buffer in the layer's layout."""
    return np.ascontiguousarray(to_flat(from_canonical(canon, layer, batch), layer),
                                dtype=np.float64)


def _per_channel(values, layer: Layer) -> np.ndarray:
    """Return per-channel values (scale, offset) as float64 of shape (1, C, 1)."""
    return np.asarray(values, dtype=np.float64).reshape(1, layer.num_channels, 1)


def _per_observation(values, layer: Layer, nobs: int) -> np.ndarray:
    """Return a flat batch x C array (ada_scale, ada_shift) as float64 of shape (N, C, 1)."""
    return np.asarray(values, dtype=np.float64).reshape(nobs, layer.num_channels, 1)


def _input(x: np.ndarray, layer: Layer, skip) -> np.ndarray:
    """Return the values the layer normalizes: x, or x + skip rounded as skip_sum does."""
    if not layer.skip:
        return np.asarray(x)
    from .dtypes import dtype
    return skip_sum(x, skip, dtype(layer.dtype).numpy)


def _normalize(v: np.ndarray, layer: Layer, batch: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (x^ as (N, C, R), mean, rstd as (N, G)) of the flat buffer v.

    Each group's sums are taken relative to its pilot (its first element: v - pilot is
    exact for inputs narrower than float64, so a mean far from zero costs no precision), as
    gncodegen.reference does: the mean of v - pilot, a refinement of it, then the biased
    variance of what is left.
    """
    canon = _canon(v, layer, batch)
    nobs, channels, reduced = canon.shape
    groups = canon.reshape(nobs, layer.num_groups, -1)     # (N, G, cpg * R), channel-major
    count = groups.shape[2]
    pilot = groups[:, :, :1]
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        shifted = groups - pilot
        m1 = np.sum(shifted, axis=2, keepdims=True) / count
        m2 = np.sum(shifted - m1, axis=2, keepdims=True) / count
        centred = (shifted - m1) - m2
        var = np.sum(np.square(centred), axis=2, keepdims=True) / count
        rstd = 1.0 / np.sqrt(var + layer.epsilon)
        xhat = (centred * rstd).reshape(nobs, channels, reduced)
    mean = (pilot + m1) + m2
    return xhat, mean[:, :, 0], rstd[:, :, 0]


def train_statistics(x: np.ndarray, layer: Layer, batch: int, skip=None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Return (mean, rstd) in float64 of every (observation, group) of a flat buffer x in the
    layer's layout, each of length batch x num_groups, element n*G + g (a format without B
    has one observation). rstd = 1/sqrt(biased variance + epsilon). A skip layer's
    statistics are those of x + skip rounded once to the storage type (skip_sum).
    """
    _, mean, rstd = _normalize(_input(x, layer, skip), layer, batch)
    return mean.reshape(-1), rstd.reshape(-1)


def reference_backward(layer: Layer, x: np.ndarray, dy: np.ndarray, batch: int,
                       scale=None, offset=None, skip=None, ada_scale=None, ada_shift=None
                       ) -> dict:
    """Return the float64 gradients of the layer's forward pass given dy = dL/dy.

    x, dy (and skip) are flat buffers in the layer's layout; scale and offset default to the
    layer's own; ada_scale and ada_shift are flat batch x channels arrays (adaptive layers).
    The result maps:

    - ``dx``: dL/dx, flat float64 in the layer's layout (on a skip layer also dL/dskip);
    - ``dscale``, ``doffset``: dL/dscale and dL/doffset per channel, summed over the batch;
    - ``dada_scale``, ``dada_shift``: dL/dada_scale and dL/dada_shift, flat batch x
      channels (None unless the layer is adaptive);
    - ``dx_terms``: the largest |rstd * dx^| (dx^ = dL/dx^), the size of the terms each dx is
      made of: in a group of a few elements they cancel to far less than that, in any
      floating-point arithmetic, so an error in dx is measured against it.
    """
    scale = _per_channel(layer.scale if scale is None else scale, layer)
    offset = _per_channel(layer.offset if offset is None else offset, layer)
    nobs = _observations(layer, batch)
    xhat, _, rstd = _normalize(_input(x, layer, skip), layer, batch)
    dy = _canon(dy, layer, batch)

    z0 = xhat * scale + offset
    if layer.adaptive:
        gain = 1.0 + _per_observation(ada_scale, layer, nobs)
        z = z0 * gain + _per_observation(ada_shift, layer, nobs)
    else:
        gain, z = None, z0
    g = dy * layer.activation.derivative(z)                  # dL/dz

    dada_scale = dada_shift = None
    if layer.adaptive:
        dada_shift = np.sum(g, axis=2).reshape(-1)
        dada_scale = np.sum(g * z0, axis=2).reshape(-1)
        dz0 = g * gain
    else:
        dz0 = g
    dscale = np.sum(dz0 * xhat, axis=(0, 2))
    doffset = np.sum(dz0, axis=(0, 2))

    # dL/dv of x^ = (v - mean) * rstd, group by group
    shape = (nobs, layer.num_groups, -1)
    dxhat = (dz0 * scale).reshape(shape)
    xhat_g = xhat.reshape(shape)
    mean_dxhat = np.mean(dxhat, axis=2, keepdims=True)
    mean_dxhat_xhat = np.mean(dxhat * xhat_g, axis=2, keepdims=True)
    dv = rstd[:, :, None] * (dxhat - mean_dxhat - xhat_g * mean_dxhat_xhat)
    dx = _flat(dv.reshape(xhat.shape), layer, batch)
    terms = float(np.max(np.abs(rstd[:, :, None] * dxhat))) if dxhat.size else 0.0
    return {"dx": dx, "dscale": dscale, "doffset": doffset,
            "dada_scale": dada_scale, "dada_shift": dada_shift, "dx_terms": terms}


# --------------------------------------------------------------------------- the solvers


def _factors(layer: Layer, which: str) -> tuple[float, float]:
    """Return (learn-rate factor, L2 factor) of a parameter (scale or offset)."""
    return (getattr(layer, f"{which}_learn_rate_factor"), getattr(layer, f"{which}_l2_factor"))


def _gradient(dp, p, l2_regularization: float, l2_factor: float) -> np.ndarray:
    """Return the regularized gradient dp + l2_regularization * L2Factor * p."""
    return np.asarray(dp, dtype=np.float64) + (l2_regularization * l2_factor) * p


def _copies(*arrays) -> list[np.ndarray]:
    """Return float64 copies of arrays (the solvers never modify their inputs)."""
    return [np.array(a, dtype=np.float64) for a in arrays]


def sgdm_reference(layer: Layer, scale, offset, scale_velocity, offset_velocity,
                   dscale, doffset, learn_rate: float, momentum: float,
                   l2_regularization: float) -> tuple[np.ndarray, ...]:
    """Return (scale, offset, scale_velocity, offset_velocity) after one step of MATLAB's
    sgdmupdate on each parameter p (new float64 arrays):

        g = dp + l2_regularization * L2Factor_p * p
        velocity = momentum * velocity - learn_rate * LearnRateFactor_p * g
        p = p + velocity

    A parameter whose learn-rate factor is 0 keeps its value and its velocity.
    """
    out = []
    for which, p, vel, dp in (("scale", scale, scale_velocity, dscale),
                              ("offset", offset, offset_velocity, doffset)):
        p, vel = _copies(p, vel)
        lr_factor, l2_factor = _factors(layer, which)
        if lr_factor != 0:
            g = _gradient(dp, p, l2_regularization, l2_factor)
            vel = momentum * vel - (learn_rate * lr_factor) * g
            p = p + vel
        out.append((p, vel))
    (s, sv), (o, ov) = out
    return s, o, sv, ov


def adam_reference(layer: Layer, scale, offset, scale_m, offset_m, scale_v, offset_v,
                   dscale, doffset, step: int, learn_rate: float, beta1: float, beta2: float,
                   epsilon: float, l2_regularization: float) -> tuple[np.ndarray, ...]:
    """Return (scale, offset, scale_m, offset_m, scale_v, offset_v) after step `step`
    (counted from 1) of MATLAB's adamupdate on each parameter p (new float64 arrays):

        g = dp + l2_regularization * L2Factor_p * p
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g^2
        p = p - lr * sqrt(1 - beta2^step) / (1 - beta1^step) * m / (sqrt(v) + epsilon)

    with lr = learn_rate * LearnRateFactor_p. A parameter whose learn-rate factor is 0 keeps
    its value and both its moments.
    """
    if step < 1:
        raise ValueError(f"adam steps count from 1, got {step}")
    out = []
    for which, p, m, v, dp in (("scale", scale, scale_m, scale_v, dscale),
                               ("offset", offset, offset_m, offset_v, doffset)):
        p, m, v = _copies(p, m, v)
        lr_factor, l2_factor = _factors(layer, which)
        if lr_factor != 0:
            g = _gradient(dp, p, l2_regularization, l2_factor)
            m = beta1 * m + (1.0 - beta1) * g
            v = beta2 * v + (1.0 - beta2) * np.square(g)
            lr = learn_rate * lr_factor
            rate = lr * np.sqrt(1.0 - beta2 ** step) / (1.0 - beta1 ** step)
            p = p - rate * m / (np.sqrt(v) + epsilon)
        out.append((p, m, v))
    (s, sm, sv), (o, om, ov) = out
    return s, o, sm, om, sv, ov


def rmsprop_reference(layer: Layer, scale, offset, scale_sq, offset_sq, dscale, doffset,
                      learn_rate: float, rho: float, epsilon: float,
                      l2_regularization: float) -> tuple[np.ndarray, ...]:
    """Return (scale, offset, scale_sq, offset_sq) after one step of MATLAB's rmspropupdate
    on each parameter p (new float64 arrays):

        g = dp + l2_regularization * L2Factor_p * p
        sq = rho * sq + (1 - rho) * g^2
        p = p - learn_rate * LearnRateFactor_p * g / (sqrt(sq) + epsilon)

    A parameter whose learn-rate factor is 0 keeps its value and its average of squares.
    """
    out = []
    for which, p, sq, dp in (("scale", scale, scale_sq, dscale),
                             ("offset", offset, offset_sq, doffset)):
        p, sq = _copies(p, sq)
        lr_factor, l2_factor = _factors(layer, which)
        if lr_factor != 0:
            g = _gradient(dp, p, l2_regularization, l2_factor)
            sq = rho * sq + (1.0 - rho) * np.square(g)
            p = p - (learn_rate * lr_factor) * g / (np.sqrt(sq) + epsilon)
        out.append((p, sq))
    (s, ssq), (o, osq) = out
    return s, o, ssq, osq
