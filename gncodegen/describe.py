"""A layer and each target's choices in words: what `gncodegen show` prints and the report
shows, written once."""

from __future__ import annotations

from .plan import Plan


def preview(values: tuple[float, ...], n: int = 4) -> str:
    """Return the first values of a parameter and their count: `[1, 1, ...] (20 values)`."""
    head = ", ".join(f"{v:.6g}" for v in values[:n])
    return f"[{head}{', ...' if len(values) > n else ''}] ({len(values)} values)"


def layer_rows(plan: Plan) -> list[tuple[str, str]]:
    """Return (key, value) of a resolved layer, in the spec's terms."""
    layer = plan.layer
    return [
        ("num_groups", f"{layer.num_groups} ({layer.num_groups_given})"),
        ("num_channels", str(layer.num_channels)),
        ("format", f"{layer.format} ({layer.layout})"),
        ("input_size", " x ".join(map(str, layer.input_size))),
        ("epsilon", repr(layer.epsilon)),
        ("dtype", layer.dtype),
        ("fused", layer.fusion_text().removesuffix(", fused") or "nothing"),
        ("scale", f"{layer.scale_source}: {preview(plan.scale_values)}"),
        ("offset", f"{layer.offset_source}: {preview(plan.offset_values)}"),
        ("learn rate factors", f"scale {layer.scale_learn_rate_factor:g}, "
                               f"offset {layer.offset_learn_rate_factor:g}"),
        ("L2 factors", f"scale {layer.scale_l2_factor:g}, offset {layer.offset_l2_factor:g}"),
        ("training", "forward_train, backward, sgdm/adam/rmsprop updates" if layer.training
         else "no (prediction only)"),
    ]


def option_rows(target, plan: Plan) -> list[tuple[str, str]]:
    """Return (key, value) of a target's own spec options for a layer."""
    out = []
    for option in target.spec_options:
        value = option.value(plan.layer)
        out.append((option.key, ", ".join(map(str, value)) if isinstance(value, tuple)
                    else str(value)))
    return out


def choice_lines(target, record, plan: Plan) -> list[str]:
    """Return what a target decided for a layer, past the plan's own summary."""
    return list(target.describe(record)[len(plan.summary):])
