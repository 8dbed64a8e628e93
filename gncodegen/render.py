"""Rendering: Jinja2 templates print what the plan and the target records computed."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import jinja2

from .activations import literals as activation_literals
from .dtypes import c_literal

from .plan import Loop


def template_dir() -> Path:
    """Return the folder holding the templates (the installed copy or the source tree's)."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "templates", package.parent / "templates"):
        if (candidate / "common" / "macros.j2").is_file():
            return candidate
    raise FileNotFoundError(f"gncodegen's templates are missing beside {package}")


def printed(loop: Loop) -> bool:
    """Whether a loop is printed as one: a loop of one iteration is not (its index is 0); one
    whose extent holds a runtime size always is."""
    return loop.extent > 1 or loop.per_batch or bool(loop.extent_syms)


def offset_expr(loops: tuple[Loop, ...]) -> str:
    """Return the element offset of a loop nest's current iteration, e.g. `i_t * t_s + c`."""
    terms = [lp.index if lp.stride_expr == "1" else f"{lp.index} * {lp.stride_expr}"
             for lp in loops if printed(lp)]
    return " + ".join(terms) if terms else "0"


def add(a, b) -> str:
    """Return the C sum of two index terms, folding zeros and integer constants: `k + 4`, `5`."""
    a, b = str(a), str(b)
    if a.isdigit() and b.isdigit():
        return str(int(a) + int(b))
    kept = [t for t in (a, b) if t != "0"]
    return " + ".join(kept) if kept else "0"


def mul(a, b) -> str:
    """Return the C product of an index term and a constant, folding 0 and 1: `j * 4`, `0`, `k`."""
    a, b = str(a), str(b)
    if "0" in (a, b):
        return "0"
    if a.isdigit() and b.isdigit():
        return str(int(a) * int(b))
    kept = [t for t in (a, b) if t != "1"]
    return " * ".join(kept) if kept else "1"


def dedent(text: str, width: int = 4) -> str:
    """Return text with `width` leading spaces taken off every line that has them."""
    pad = " " * width
    return "\n".join(line[width:] if line.startswith(pad) else line
                     for line in text.split("\n"))


def wrap_list(text: str, width: int = 100) -> str:
    """Return a one-line declaration or call broken after commas so that no line is longer
    than width, the continuation lines indented one level past the first line's indentation.
    Text that fits, or that has no argument list, is returned as it is."""
    if len(text) <= width or "(" not in text or "\n" in text:
        return text
    lead = text[:len(text) - len(text.lstrip())]
    pad = lead + "    "
    head, rest = text.split("(", 1)
    parts = rest.split(", ")
    lines, line = [], head + "(" + parts[0]
    for part in parts[1:]:
        if len(line) + len(part) + 3 > width:  # ", " before it, "," after it
            lines.append(line + ",")
            line = pad + part
        else:
            line += ", " + part
    return "\n".join([*lines, line])


def product(factors) -> str:
    """Return factors joined by ' * ', leaving out literal ones (all ones give '0'-safe '1')."""
    kept = [str(f) for f in factors if str(f) != "1"]
    if any(str(f) == "0" for f in factors):
        return "0"
    return " * ".join(kept) if kept else "1"


def value_lines(literals, per_line: int) -> str:
    """Return literals as the body of an initializer: a newline, then per_line a line, each
    line indented by four spaces and every value but the last followed by a comma."""
    lines = (", ".join(literals[i:i + per_line]) for i in range(0, len(literals), per_line))
    return "".join(f"\n    {line}," for line in lines)[:-1] if literals else ""


@functools.lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    """Return the strict Jinja2 environment shared by every target."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(template_dir())),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=False,
        lstrip_blocks=False,
        autoescape=False,
    )
    env.filters["offset_expr"] = offset_expr
    env.filters["product"] = product
    env.filters["add"] = add
    env.filters["mul"] = mul
    env.filters["dedent"] = dedent
    env.filters["wrap_list"] = wrap_list
    env.filters["value_lines"] = value_lines
    env.tests["printed"] = printed
    env.globals["activation_literals"] = activation_literals
    env.globals["c_literal"] = c_literal
    return env


@dataclass(frozen=True)
class Source:
    """One generated file: its name and text."""

    name: str
    text: str


def render_template(name: str, **context) -> str:
    """Return a template rendered with context, ending in exactly one newline."""
    text = environment().get_template(name).render(**context)
    lines = [line.rstrip() for line in text.splitlines()]
    return "\n".join(lines).strip("\n") + "\n"
