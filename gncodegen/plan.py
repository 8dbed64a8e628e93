"""Lowering: pure functions from a validated Layer to the facts every target builds on.

No I/O and no code text: sizes, strides, loop nests, group ranges and the parameters rounded
to the dtype are computed and asserted here. Each target lowers this Plan further into its own
record (gncodegen.targets), where the kernel strategy and the literals it prints are decided.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from . import __version__
from .text import counted
from .dtypes import DType, dtype
from .spec import Layer, RuntimeSize, Spec

REDUCED_LABELS = "STU"
# A runtime size without a bound counts as a group of up to 2^40 elements (far more than any
# memory holds in one observation) where a kernel is sized for the largest group, the rescue.
UNBOUNDED_GROUP = 1 << 40


# --------------------------------------------------------------------------- memory layout


def sym_product(const: int, syms: tuple[str, ...]) -> str:
    """Return const times the runtime sizes syms as C spells it: `s1`, `4 * s1 * s2`, `12`."""
    if not syms:
        return str(const)
    return " * ".join(([] if const == 1 else [str(const)]) + list(syms))


@dataclass(frozen=True)
class Dim:
    """One format dimension placed in memory: stride in elements (times batch if per_batch,
    and times the runtime sizes stride_syms)."""

    label: str          # format letter with an ordinal where repeated: S1, S2, C, B, T, U1
    size: int | RuntimeSize | None    # None for B (runtime batch)
    stride: int
    per_batch: bool
    stride_syms: tuple[str, ...] = ()


@dataclass(frozen=True)
class Loop:
    """One loop of the nest that visits a group: extent and stride in elements."""

    index: str          # loop variable
    extent: int         # times the runtime sizes extent_syms
    stride: int         # multiplied by the batch count when per_batch, and by stride_syms
    per_batch: bool
    labels: str         # the format dimensions it covers, for comments
    is_channel: bool
    extent_syms: tuple[str, ...] = ()
    stride_syms: tuple[str, ...] = ()

    @property
    def runtime_stride(self) -> bool:
        """True when the stride is known only at run time (it holds the batch or a size)."""
        return self.per_batch or bool(self.stride_syms)

    @property
    def stride_expr(self) -> str:
        """The stride as generated code spells it (a literal or a runtime local)."""
        return f"{self.index}_stride" if self.runtime_stride else str(self.stride)

    @property
    def stride_value(self) -> str:
        """The C expression a runtime stride's local is set to, from batch and the sizes."""
        head = [] if self.stride == 1 and self.stride_syms else [f"(size_t){self.stride}"]
        return " * ".join([*head, *self.stride_syms, *(["batch"] if self.per_batch else [])])

    @property
    def extent_expr(self) -> str:
        """The extent as generated code spells it: a literal, or a product of runtime sizes."""
        return sym_product(self.extent, self.extent_syms)


@dataclass(frozen=True)
class Layout:
    """Where every element of a layer's tensor lives in memory."""

    dims: tuple[Dim, ...]            # fastest first
    batch_stride: int                # elements between observation n and n+1 (times the
    batch_stride_syms: tuple[str, ...]  # runtime sizes these name)
    channel_stride: int              # elements between channel c and c+1
    channel_per_batch: bool
    group_loops: tuple[Loop, ...]    # slowest first; visits one (observation, group)
    stats_loops: tuple[Loop, ...]    # group_loops with collapsible loops merged (channel too)
    group_contiguous: bool           # a group is one unit-stride run
    channels_last: bool              # channel stride 1: one spatial index holds all channels
    runtime_strides: tuple[Loop, ...]  # loops whose stride depends on the batch count

    @property
    def batch_stride_expr(self) -> str:
        """The distance between observations as generated code spells it from the sizes: the
        observation's element count `numel` where B is the slowest dimension, else B's own
        stride (CBT row-major keeps T outside B: the stride is C alone)."""
        slowest = self.dims[-1].label == "B" if self.dims else True
        if slowest:
            return "numel"
        return sym_product(self.batch_stride, self.batch_stride_syms)


def _labelled(fmt: str) -> list[str]:
    counts: dict[str, int] = {}
    out = []
    for ch in fmt:
        counts[ch] = counts.get(ch, 0) + 1
        many = fmt.count(ch) > 1
        out.append(f"{ch}{counts[ch]}" if many else ch)
    return out


def memory_dims(layer: Layer) -> tuple[Dim, ...]:
    """Return the layer's dims fastest first with element strides (the layout rules in docs/design.md)."""
    labels = _labelled(layer.format)
    sizes = [size for _, size in layer.dims()]
    order = list(range(len(labels)))
    if layer.layout == "row-major":
        order.reverse()
    dims = []
    stride, per_batch, syms = 1, False, ()
    for i in order:
        dims.append(Dim(labels[i], sizes[i], stride, per_batch, syms))
        if sizes[i] is None:
            per_batch = True
        elif isinstance(sizes[i], RuntimeSize):
            syms = (*syms, sizes[i].name)
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
                        and sorted(prev.stride_syms) == sorted(loop.stride_syms
                                                               + loop.extent_syms)
                        and not (keep_channel and (prev.is_channel or loop.is_channel)))
            if joinable:
                out[-1] = Loop(index=f"{prev.index}{loop.index.removeprefix('i_')}",
                               extent=prev.extent * loop.extent, stride=loop.stride,
                               per_batch=False, labels=f"{prev.labels}*{loop.labels}",
                               is_channel=False,
                               extent_syms=(*prev.extent_syms, *loop.extent_syms),
                               stride_syms=loop.stride_syms)
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
            nest.append(Loop("c", cpg, d.stride, d.per_batch, "C", True,
                             stride_syms=d.stride_syms))
        elif isinstance(d.size, RuntimeSize):
            nest.append(Loop(f"i_{d.label.lower()}", 1, d.stride, d.per_batch, d.label, False,
                             extent_syms=(d.size.name,), stride_syms=d.stride_syms))
        elif d.size != 1:
            nest.append(Loop(f"i_{d.label.lower()}", d.size, d.stride, d.per_batch, d.label,
                             False, stride_syms=d.stride_syms))
    group_loops = _merge(nest, keep_channel=True)
    stats_loops = _merge(nest, keep_channel=False)
    # Loop variable names must stay unique after merging.
    assert len({lp.index for lp in group_loops}) == len(group_loops)
    contiguous = (len(stats_loops) == 1 and stats_loops[0].stride == 1
                  and not stats_loops[0].runtime_stride)
    if not layer.runtime_sizes:
        numel = math.prod(lp.extent for lp in group_loops)
        assert numel == cpg * layer.observation_numel // layer.num_channels
    return Layout(
        dims=dims, batch_stride=batch_stride,
        batch_stride_syms=batch.stride_syms if batch else (), channel_stride=chan.stride,
        channel_per_batch=chan.per_batch, group_loops=tuple(group_loops),
        stats_loops=tuple(stats_loops), group_contiguous=contiguous,
        channels_last=chan.stride == 1 and not chan.per_batch and not chan.stride_syms,
        runtime_strides=tuple(lp for lp in group_loops if lp.runtime_stride),
    )


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Plan:
    """The target-independent facts of one layer that every target lowers further."""

    layer: Layer
    prefix: str                 # lower-case symbol prefix (the layer name)
    macro: str                  # upper-case macro prefix
    dtype: DType
    layout: Layout
    num_channels: int
    num_groups: int
    channels_per_group: int
    group_numel: int | None     # elements in one (observation, group); None: runtime sizes
    observation_numel: int | None
    has_batch: bool
    scale_values: tuple[float, ...]   # rounded to the dtype: what the code computes with
    offset_values: tuple[float, ...]
    summary: tuple[str, ...]    # lines of the plan comment in generated headers
    generator: str
    runtime_sizes: tuple[RuntimeSize, ...] = ()   # size_t arguments after batch
    largest_group_numel: int = 0      # the most elements a group can have (runtime sizes at
                                      # their bounds, an unbounded one at UNBOUNDED_GROUP)
    group_numel_expr: str = ""        # the element counts as C spells them from the sizes
    observation_numel_expr: str = ""

    @property
    def channel_loop(self) -> Loop:
        """The loop over the channels of a group."""
        return next(lp for lp in self.layout.group_loops if lp.is_channel)


def _dims_text(layout: Layout) -> str:
    return ", ".join(f"{d.label} {'batch' if d.size is None else d.size}" for d in layout.dims)


def _largest_group(fixed_group: int, runtime: tuple[RuntimeSize, ...]) -> int:
    most = fixed_group
    for r in runtime:
        most *= r.max if r.max is not None else UNBOUNDED_GROUP
    return min(most, UNBOUNDED_GROUP) if runtime else fixed_group


def lower(layer: Layer) -> Plan:
    """Return the Plan for one layer."""
    dt = dtype(layer.dtype)
    layout = analyze_layout(layer)
    cpg = layer.channels_per_group
    runtime = layer.runtime_sizes
    names = tuple(r.name for r in runtime)
    fixed = layer.fixed_numel
    group_numel = None if runtime else cpg * (fixed // layer.num_channels)
    scale = dt.round(layer.scale)
    offset = dt.round(layer.offset)

    shape = "x".join(str(s) for s in layer.input_size)
    group_text = sym_product(cpg * (fixed // layer.num_channels), names)
    if layout.group_contiguous:
        access = (f"each group is one contiguous run of {group_text} "
                  f"{'element' if group_text == '1' else 'elements'}")
    elif layout.channels_last:
        access = (f"channels are fastest: a group is {sym_product(fixed // layer.num_channels, names)} "
                  f"runs of {cpg} channel{'s' if cpg > 1 else ''}")
    else:
        access = "a group is visited as " + " x ".join(
            f"{lp.labels}[{lp.extent_expr}] stride {sym_product(lp.stride, lp.stride_syms)}"
            f"{'*batch' if lp.per_batch else ''}"
            for lp in layout.group_loops)
    batch_text = "batch count at run time" if layer.has_batch else "no B dimension: batch is 1"
    summary = (
        f"format {layer.format} ({layer.layout}), input {shape}, {batch_text}",
        f"{counted(layer.num_channels, 'channel')} in {counted(layer.num_groups, 'group')} "
        f"of {cpg}; {group_text} {'element' if group_text == '1' else 'elements'} per group"
        + ("".join(f"; {r.name} at run time" + ("" if r.max is None else f", at most {r.max}")
                   for r in runtime)),
        f"memory order, fastest first: {_dims_text(layout)}",
        access,
        f"dtype {layer.dtype}, epsilon {layer.epsilon!r}"
        + (f"; {layer.fusion_text()}" if layer.fused else ""),
        f"scale: {layer.scale_source}; offset: {layer.offset_source}",
    )  # each target's kernel comment says how it computes (numerics differ per target)
    return Plan(
        layer=layer, prefix=layer.name, macro=layer.name.upper(), dtype=dt, layout=layout,
        num_channels=layer.num_channels, num_groups=layer.num_groups, channels_per_group=cpg,
        group_numel=group_numel, observation_numel=None if runtime else layer.observation_numel,
        has_batch=layer.has_batch,
        scale_values=tuple(float(v) for v in scale),
        offset_values=tuple(float(v) for v in offset),
        summary=summary, generator=f"gncodegen {__version__}",
        runtime_sizes=runtime, group_numel_expr=group_text,
        largest_group_numel=_largest_group(cpg * (fixed // layer.num_channels), runtime),
        observation_numel_expr=sym_product(fixed, names),
    )


def lower_spec(spec: Spec) -> tuple[Plan, ...]:
    """Return one Plan per layer of a spec."""
    return tuple(lower(layer) for layer in spec.layers)
