"""The Python interface: load a spec, compile its layers for this host, call them on arrays.

    import gncodegen
    lib = gncodegen.compile(gncodegen.load("examples/matlab_gn.yaml"))
    y = lib["matlab_gn"](x)            # x: an array in the format's order, batch on B

A layer's callable takes arrays of any strides in the format's logical shape (the batch on B,
runtime sizes from the shape), checks their dtype and shape, lays them out as the spec says,
calls the generated C and returns a new array of the same shape.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from .errors import GncodegenError
from .plan import lower
from .reference import to_flat, to_logical
from .spec import Layer, RuntimeSize, Spec


class ArgumentError(GncodegenError, ValueError):
    """An array passed to a compiled layer does not suit it; the message says which and why."""


def load(source: str | os.PathLike | Mapping[str, Any], allow_code: bool = False) -> Spec:
    """Return the validated Spec of a YAML file, or of a mapping with the same keys (a layer's
    keys, or `layers: [...]`; relative file paths resolve in the working directory)."""
    from . import pipeline, spec as specs
    from .targets import spec_options

    if isinstance(source, Mapping):
        import hashlib
        import json
        doc = dict(source)
        stem = str(doc.get("name", "spec")) if "layers" not in doc else "spec"
        digest = hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()
        return specs.spec_of(doc, Path.cwd(), stem, "<dict>", allow_code, digest,
                             spec_options())
    return pipeline.load_spec(source, allow_code=allow_code)


def compile(spec: Spec | str | os.PathLike | Mapping[str, Any], target: str = "c",  # noqa: A001
            flags: tuple[str, ...] | None = None) -> "Library":
    """Return the spec's layers built for this host as a Library of callables by name.

    target: "c" (the generated C, compiled here through cffi; flags: the compiler's, the
    verification build's by default). The other targets are built with `gncodegen build`.
    """
    if target != "c":
        raise ArgumentError(f"target: the Python interface runs the c target on this host, "
                            f"not {target!r} (`gncodegen build --target {target}` writes it)")
    if not isinstance(spec, Spec):
        spec = load(spec)
    from .targets.c import render_c, spec_file_name
    from .targets.c.record import lower_c
    from .targets.c.runner import HOST_FLAGS, build_c_module

    records = tuple(lower_c(lower(layer)) for layer in spec.layers)
    name = spec_file_name(spec)
    sources = [src for rec in records for src in render_c(rec, name)]
    module = build_c_module(records, sources, flags=HOST_FLAGS if flags is None else flags)
    return Library(spec, {rec.plan.prefix: CompiledLayer(rec, module) for rec in records})


@dataclass(frozen=True)
class Library:
    """A compiled spec: its layers' callables by name, in the spec's order."""

    spec: Spec
    layers: dict[str, "CompiledLayer"]

    def __getitem__(self, name: str) -> "CompiledLayer":
        try:
            return self.layers[name]
        except KeyError:
            raise KeyError(f"no layer {name!r} in {self.spec.path} (it has "
                           f"{', '.join(self.layers)})") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)


class CompiledLayer:
    """One layer's entry points in a built module, called on arrays in the format's order."""

    def __init__(self, record, module) -> None:
        self.record = record
        self.plan = record.plan
        self.layer: Layer = record.plan.layer
        self._module = module
        prefix = self.plan.prefix
        self._predict = getattr(module.lib, f"{prefix}_predict")
        self._predict_with = getattr(module.lib, f"{prefix}_predict_with_params")

    @property
    def name(self) -> str:
        """The layer's name (its functions' prefix)."""
        return self.layer.name

    @property
    def dtype(self) -> np.dtype:
        """The element type the layer takes and returns."""
        return np.dtype(self.plan.dtype.numpy)

    def shape_text(self) -> str:
        """The shape an input must have, in the format's order: `(24, 24, 20, batch)`."""
        parts = []
        for label, size in self.layer.dims():
            if label == "B":
                parts.append("batch")
            elif isinstance(size, RuntimeSize):
                parts.append(f"{label.lower()}" + ("" if size.max is None else f"<={size.max}"))
            else:
                parts.append(str(size))
        return "(" + ", ".join(parts) + ")"

    def _array(self, value: Any, what: str) -> np.ndarray:
        if not hasattr(value, "dtype"):        # nested lists carry no type: take the layer's
            return np.asarray(value, dtype=self.dtype)
        arr = np.asarray(value)
        if arr.dtype != self.dtype:
            raise ArgumentError(
                f"layer '{self.name}': {what} has dtype {arr.dtype}, the layer takes "
                f"{self.dtype} ({self.layer.dtype}); convert it with .astype(numpy.{self.dtype})")
        return arr

    def _shape(self, x: np.ndarray) -> tuple[int, tuple[int, ...]]:
        """Return (batch, runtime sizes) of an input, or raise naming the rule it breaks."""
        dims = self.layer.dims()
        if x.ndim != len(dims):
            raise ArgumentError(f"layer '{self.name}': x has {x.ndim} dimensions {x.shape}, the "
                                f"format {self.layer.format} has {len(dims)}: "
                                f"{self.shape_text()}")
        batch, sizes = 1, []
        for axis, ((label, size), got) in enumerate(zip(dims, x.shape)):
            if label == "B":
                batch = got
            elif isinstance(size, RuntimeSize):
                if got < 1 or (size.max is not None and got > size.max):
                    bound = "at least 1" if size.max is None else f"1 to {size.max}"
                    raise ArgumentError(f"layer '{self.name}': x's axis {axis} ({label}) is "
                                        f"{got}, the layer takes {bound} there")
                sizes.append(got)
            elif got != size:
                raise ArgumentError(f"layer '{self.name}': x has shape {x.shape}, the layer "
                                    f"takes {self.shape_text()} (axis {axis}, {label}, must be "
                                    f"{size})")
        return batch, tuple(sizes)

    def __call__(self, x: Any, scale: Any = None, offset: Any = None, *, skip: Any = None,
                 ada_scale: Any = None, ada_shift: Any = None,
                 sum: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:  # noqa: A002
        """Return the layer's output for x (a new array of x's shape), with the caller's scale
        and offset (both, or neither for the baked ones) and the fusion inputs the spec asks
        for; with a skip and sum=True, return (y, x + skip)."""
        layer = self.layer
        x = self._array(x, "x")
        batch, sizes = self._shape(x)
        fixed = layer.at_sizes(sizes) if sizes else layer
        ffi = self._module.ffi
        ctype = self.record.ctype
        keep = []                                      # the buffers cffi points into

        def pointer(flat: np.ndarray):
            keep.append(flat)
            return ffi.from_buffer(f"{ctype}[]", flat)

        def tensor(value, what):
            arr = self._array(value, what)
            if arr.shape != x.shape:
                raise ArgumentError(f"layer '{self.name}': {what} has shape {arr.shape}, "
                                    f"x has {x.shape}; they must match")
            return np.ascontiguousarray(to_flat(arr, fixed))

        def per_channel(value, what, rows):
            arr = self._array(value, what)
            want = (rows, layer.num_channels) if layer.has_batch else (layer.num_channels,)
            if arr.shape != want and not (not layer.has_batch and arr.shape == (1, *want)):
                raise ArgumentError(f"layer '{self.name}': {what} has shape {arr.shape}, the "
                                    f"layer takes {want}")
            return np.ascontiguousarray(arr.reshape(-1))

        if (scale is None) != (offset is None):
            raise ArgumentError(f"layer '{self.name}': pass both scale and offset, or neither "
                                "(the baked parameters)")
        if sum and not layer.skip:
            raise ArgumentError(f"layer '{self.name}': sum=True needs a skip layer (skip: true)")
        given = {"skip": skip, "ada_scale": ada_scale, "ada_shift": ada_shift}
        for name, value in given.items():
            wanted = layer.skip if name == "skip" else layer.adaptive
            if wanted and value is None:
                key = "skip" if name == "skip" else "adaptive"
                raise ArgumentError(f"layer '{self.name}': {name}= is required (the spec sets "
                                    f"{key}: true)")
            if not wanted and value is not None:
                raise ArgumentError(f"layer '{self.name}': {name}= given, but the spec does "
                                    "not fuse it")
        flat = np.ascontiguousarray(to_flat(x, fixed))
        y = np.empty_like(flat)
        written = np.empty_like(flat) if sum else None
        fusion = []
        for name in layer.fusion_args:
            if name == "skip":
                fusion.append(pointer(tensor(skip, "skip")))
            elif name == "sum":
                fusion.append(pointer(written) if sum else ffi.NULL)
            else:
                fusion.append(pointer(per_channel(given[name], name, batch)))
        if scale is None:
            rc = self._predict(pointer(flat), pointer(y), batch, *sizes, *fusion)
        else:
            params = [pointer(self._parameter(v, w)) for v, w in
                      ((scale, "scale"), (offset, "offset"))]
            rc = self._predict_with(pointer(flat), pointer(y), batch, *sizes, *params, *fusion)
        if rc != 0:
            raise ArgumentError(f"layer '{self.name}': {self.plan.prefix}_predict returned {rc}")
        out = to_logical(y, fixed, batch)
        return (out, to_logical(written, fixed, batch)) if sum else out

    def _parameter(self, value: Any, what: str) -> np.ndarray:
        """Return a caller's scale or offset as the C takes it: num_channels values of the
        layer's dtype (any shape that holds that many)."""
        flat = self._array(value, what).reshape(-1)
        if flat.size != self.layer.num_channels:
            raise ArgumentError(f"layer '{self.name}': {what} has {flat.size} values, the "
                                f"layer has {self.layer.num_channels} channels")
        return np.ascontiguousarray(flat)

    def verify(self):
        """Return the verification Report of this build against the float64 reference (the
        report `gncodegen verify` prints)."""
        from .targets.c.runner import c_runner
        from .verify import verify_layer

        return verify_layer(self.layer, "c", "host", c_runner(self.record, self._module))

    def __repr__(self) -> str:
        return f"<gncodegen layer '{self.name}' {self.layer.format} {self.shape_text()} " \
               f"{self.layer.dtype}>"


__all__ = ["load", "compile", "Library", "CompiledLayer", "ArgumentError"]
