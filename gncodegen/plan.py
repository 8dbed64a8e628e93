"""Lowering: pure functions from a validated Layer to everything a template prints.

No I/O and no code text beyond literals and identifiers: sizes, strides, loop nests, group
ranges and folded constants are computed and asserted here; the templates only print them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import __version__
from .spec import Layer, Spec

REDUCED_LABELS = "STU"


# --------------------------------------------------------------------------- targets as data


@dataclass(frozen=True)
class ScalarType:
    """How one dtype is spelled and computed in C-family code."""

    dtype: str          # spec dtype
    ctype: str          # storage type in generated code
    acc_ctype: str      # accumulation type
    suffix: str         # literal suffix for acc_ctype literals
    sqrt: str           # square-root function on acc_ctype
    numpy: str          # numpy dtype name of the storage type
    bytes: int


SCALAR_TYPES = {
    "single": ScalarType("single", "float", "float", "f", "sqrtf", "float32", 4),
    "double": ScalarType("double", "double", "double", "", "sqrt", "float64", 8),
    "half": ScalarType("half", "__half", "float", "f", "sqrtf", "float16", 2),
    "bfloat16": ScalarType("bfloat16", "__nv_bfloat16", "float", "f", "sqrtf", "bfloat16", 2),
}


def c_literal(value: float, dtype: str) -> str:
    """Return a C literal that reads back as exactly value rounded to dtype's acc type."""
    if dtype == "double":
        v = float(value)
        text = repr(v)
        suffix = ""
    else:
        v = np.float32(value)
        text = str(v)  # numpy prints the shortest string that round-trips in float32
        suffix = "f"
    if not math.isfinite(float(v)):
        raise ValueError(f"literal {value!r} is not finite in {dtype}")
    if "e" not in text and "." not in text:
        text += ".0"
    elif "e" in text and "." not in text.split("e")[0]:
        mant, exp = text.split("e")
        text = f"{mant}.0e{exp}"
    assert (float(text) if dtype == "double" else np.float32(float(text))) == v, (text, value)
    return text + suffix


def round_to_dtype(values, dtype: str) -> np.ndarray:
    """Return values as float64 after rounding them to dtype's storage precision."""
    arr = np.asarray(values, dtype=np.float64)
    if dtype == "single":
        return arr.astype(np.float32).astype(np.float64)
    if dtype == "half":
        return arr.astype(np.float16).astype(np.float64)
    if dtype == "bfloat16":
        bits = arr.astype(np.float32).view(np.uint32).astype(np.uint64)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        return rounded.astype(np.uint32).view(np.float32).astype(np.float64)
    return arr


# --------------------------------------------------------------------------- memory layout


@dataclass(frozen=True)
class Dim:
    """One format dimension placed in memory: stride in elements (times batch if per_batch)."""

    label: str          # format letter with an ordinal where repeated: S1, S2, C, B, T, U1
    size: int | None    # None for B (runtime batch)
    stride: int
    per_batch: bool


@dataclass(frozen=True)
class Loop:
    """One loop of the nest that visits a group: extent and stride in elements."""

    index: str          # loop variable
    extent: int
    stride: int         # multiplied by the batch count when per_batch
    per_batch: bool
    labels: str         # the format dimensions it covers, for comments
    is_channel: bool

    @property
    def stride_expr(self) -> str:
        """The stride as generated code spells it (a literal or a runtime local)."""
        return f"{self.index}_stride" if self.per_batch else str(self.stride)


@dataclass(frozen=True)
class Layout:
    """Where every element of a layer's tensor lives in memory."""

    dims: tuple[Dim, ...]            # fastest first
    batch_stride: int                # elements between observation n and n+1
    channel_stride: int              # elements between channel c and c+1
    channel_per_batch: bool
    group_loops: tuple[Loop, ...]    # slowest first; visits one (observation, group)
    stats_loops: tuple[Loop, ...]    # group_loops with collapsible loops merged (channel too)
    group_contiguous: bool           # a group is one unit-stride run
    channels_last: bool              # channel stride 1: one spatial index holds all channels
    runtime_strides: tuple[Loop, ...]  # loops whose stride depends on the batch count


def _labelled(fmt: str) -> list[str]:
    counts: dict[str, int] = {}
    out = []
    for ch in fmt:
        counts[ch] = counts.get(ch, 0) + 1
        many = fmt.count(ch) > 1
        out.append(f"{ch}{counts[ch]}" if many else ch)
    return out


def memory_dims(layer: Layer) -> tuple[Dim, ...]:
    """Return the layer's dims fastest first with element strides (DESIGN.md section 3)."""
    labels = _labelled(layer.format)
    sizes = [size for _, size in layer.dims()]
    order = list(range(len(labels)))
    if layer.layout == "row-major":
        order.reverse()
    dims = []
    stride, per_batch = 1, False
    for i in order:
        dims.append(Dim(labels[i], sizes[i], stride, per_batch))
        if sizes[i] is None:
            per_batch = True
        else:
            stride *= sizes[i]
    return tuple(dims)


def _merge(loops: list[Loop], keep_channel: bool) -> list[Loop]:
    """Merge neighbouring loops (slowest first) whose strides make them one run."""
    out: list[Loop] = []
    for loop in loops:
        if out:
            prev = out[-1]
            joinable = (not prev.per_batch and not loop.per_batch
                        and prev.stride == loop.stride * loop.extent
                        and not (keep_channel and (prev.is_channel or loop.is_channel)))
            if joinable:
                out[-1] = Loop(index=f"{prev.index}{loop.index.removeprefix('i_')}",
                               extent=prev.extent * loop.extent, stride=loop.stride,
                               per_batch=False, labels=f"{prev.labels}*{loop.labels}",
                               is_channel=False)
                continue
        out.append(loop)
    return out


def analyze_layout(layer: Layer) -> Layout:
    """Return the Layout: strides, and the loop nests that visit one group."""
    dims = memory_dims(layer)
    by_label = {d.label: d for d in dims}
    batch = by_label.get("B")
    batch_stride = batch.stride if batch else 0
    chan = by_label["C"]
    cpg = layer.channels_per_group

    # Slowest first; size-1 reduced dims never matter.
    nest: list[Loop] = []
    for d in reversed(dims):
        if d.label == "B":
            continue
        if d.label == "C":
            nest.append(Loop("c", cpg, d.stride, d.per_batch, "C", True))
        elif d.size != 1:
            nest.append(Loop(f"i_{d.label.lower()}", d.size, d.stride, d.per_batch, d.label,
                             False))
    group_loops = _merge(nest, keep_channel=True)
    stats_loops = _merge(nest, keep_channel=False)
    # Loop variable names must stay unique after merging.
    assert len({lp.index for lp in group_loops}) == len(group_loops)
    contiguous = len(stats_loops) == 1 and stats_loops[0].stride == 1
    numel = math.prod(lp.extent for lp in group_loops)
    assert numel == cpg * layer.observation_numel // layer.num_channels
    return Layout(
        dims=dims, batch_stride=batch_stride, channel_stride=chan.stride,
        channel_per_batch=chan.per_batch, group_loops=tuple(group_loops),
        stats_loops=tuple(stats_loops), group_contiguous=contiguous,
        channels_last=chan.stride == 1 and not chan.per_batch,
        runtime_strides=tuple(lp for lp in group_loops if lp.per_batch),
    )


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Plan:
    """Everything the C templates print for one layer."""

    layer: Layer
    prefix: str                 # lower-case symbol prefix (the layer name)
    macro: str                  # upper-case macro prefix
    scalar: ScalarType
    layout: Layout
    num_channels: int
    num_groups: int
    channels_per_group: int
    group_numel: int            # elements in one (observation, group)
    observation_numel: int
    has_batch: bool
    epsilon_literal: str
    inv_group_numel_literal: str
    scale_literals: tuple[str, ...]
    offset_literals: tuple[str, ...]
    scale_values: tuple[float, ...]   # rounded to the dtype: what the code computes with
    offset_values: tuple[float, ...]
    threads: int
    summary: tuple[str, ...]    # lines of the plan comment in the header
    generator: str

    @property
    def channel_loop(self) -> Loop:
        """The loop over the channels of a group."""
        return next(lp for lp in self.layout.group_loops if lp.is_channel)

    @property
    def ckernel(self):
        """Return the C kernel's strategy for this plan (a gncodegen.cplan.CKernel)."""
        from .cplan import plan_kernel  # cplan builds on this module
        return plan_kernel(self)

    @property
    def ckernel_comment(self) -> tuple[str, ...]:
        """Return the lines of the C header's comment on how its kernel computes."""
        from .cplan import kernel_comment
        return kernel_comment(self)

    @property
    def batch_rule(self) -> str:
        """When a batch count is refused, in words for the header."""
        if self.has_batch:
            return f"batch * {self.observation_numel} overflows size_t"
        return "the format has no B dimension, so batch must be 1"


def _dims_text(layout: Layout) -> str:
    return ", ".join(f"{d.label} {'batch' if d.size is None else d.size}" for d in layout.dims)


def lower(layer: Layer) -> Plan:
    """Return the Plan for one layer."""
    scalar = SCALAR_TYPES[layer.dtype]
    acc = "double" if layer.dtype == "double" else "single"
    layout = analyze_layout(layer)
    cpg = layer.channels_per_group
    group_numel = cpg * (layer.observation_numel // layer.num_channels)
    scale = round_to_dtype(layer.scale, layer.dtype)
    offset = round_to_dtype(layer.offset, layer.dtype)
    lit_dtype = "double" if layer.dtype == "double" else "single"

    shape = "x".join(str(s) for s in layer.input_size)
    if layout.group_contiguous:
        access = f"each group is one contiguous run of {group_numel} elements"
    elif layout.channels_last:
        access = (f"channels are fastest: a group is {group_numel // cpg} runs of {cpg} "
                  f"channel{'s' if cpg > 1 else ''}")
    else:
        access = "a group is visited as " + " x ".join(
            f"{lp.labels}[{lp.extent}] stride {lp.stride}{'*batch' if lp.per_batch else ''}"
            for lp in layout.group_loops)
    batch_text = "batch count at run time" if layer.has_batch else "no B dimension: batch is 1"
    summary = (
        f"format {layer.format} ({layer.layout}), input {shape}, {batch_text}",
        f"{layer.num_channels} channels in {layer.num_groups} groups of {cpg}; "
        f"{group_numel} elements per group",
        f"memory order, fastest first: {_dims_text(layout)}",
        access,
        f"dtype {layer.dtype}, epsilon {layer.epsilon!r}",
        f"scale: {layer.scale_source}; offset: {layer.offset_source}",
    )  # each target's kernel comment says how it computes (numerics differ per target)
    return Plan(
        layer=layer, prefix=layer.name, macro=layer.name.upper(), scalar=scalar, layout=layout,
        num_channels=layer.num_channels, num_groups=layer.num_groups, channels_per_group=cpg,
        group_numel=group_numel, observation_numel=layer.observation_numel,
        has_batch=layer.has_batch,
        epsilon_literal=c_literal(layer.epsilon, acc),
        inv_group_numel_literal=c_literal(1.0 / group_numel, acc),
        scale_literals=tuple(c_literal(v, lit_dtype) for v in scale),
        offset_literals=tuple(c_literal(v, lit_dtype) for v in offset),
        scale_values=tuple(float(v) for v in scale),
        offset_values=tuple(float(v) for v in offset),
        threads=layer.threads, summary=summary,
        generator=f"gncodegen {__version__}",
    )


def lower_spec(spec: Spec) -> tuple[Plan, ...]:
    """Return one Plan per layer of a spec."""
    return tuple(lower(layer) for layer in spec.layers)
