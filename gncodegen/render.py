"""Rendering: Jinja2 templates print what the plan and the target records computed."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import jinja2

from .plan import Loop


def template_dir() -> Path:
    """Return the folder holding the templates (the installed copy or the source tree's)."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "templates", package.parent / "templates"):
        if (candidate / "common" / "macros.j2").is_file():
            return candidate
    raise FileNotFoundError(f"gncodegen's templates are missing beside {package}")


def offset_expr(loops: tuple[Loop, ...]) -> str:
    """Return the element offset of a loop nest's current iteration, e.g. `i_t * t_s + c`."""
    terms = [lp.index if lp.stride_expr == "1" else f"{lp.index} * {lp.stride_expr}"
             for lp in loops]
    return " + ".join(terms) if terms else "0"


def product(factors) -> str:
    """Return factors joined by ' * ', leaving out literal ones (all ones give '0'-safe '1')."""
    kept = [str(f) for f in factors if str(f) != "1"]
    if any(str(f) == "0" for f in factors):
        return "0"
    return " * ".join(kept) if kept else "1"


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
