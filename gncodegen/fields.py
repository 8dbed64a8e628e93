"""Parsers of single spec values (integers, numbers, words): each raises SpecError naming the field.

Numbers come from the YAML reader already typed (YAML 1.2 core schema): a string is never
read as a number, so `'1e-5'` and `1_0e-5` are refused rather than guessed at.
"""

from __future__ import annotations

import difflib
import math
from typing import Any

from .errors import SpecError
from .text import preview


def parse_int(value: Any, fld: str, minimum: int, maximum: int) -> int:
    """Return value as an integer in [minimum, maximum] (a float with no fraction counts)."""
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise SpecError(fld, f"must be an integer, got {preview(value)}")
    if value < minimum:
        raise SpecError(fld, f"must be at least {minimum}, got {preview(value)}")
    if value > maximum:
        raise SpecError(fld, f"must be at most {maximum}, got {preview(value)}")
    return value


def parse_number(value: Any, fld: str, positive: bool) -> float:
    """Return value as a finite float, positive or non-negative."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        shown = f"'{preview(value)}'" if isinstance(value, str) else preview(value)
        raise SpecError(fld, f"must be a number, got {shown}")
    if isinstance(value, int) and value.bit_length() > 1024:
        raise SpecError(fld, f"must be finite, got {preview(value)}")
    value = float(value)
    if not math.isfinite(value):
        raise SpecError(fld, f"must be finite, got {value}")
    if positive and value <= 0:
        raise SpecError(fld, f"must be positive, got {value!r}")
    if not positive and value < 0:
        raise SpecError(fld, f"must be non-negative, got {value!r}")
    return value


def parse_choice(value: Any, fld: str, choices: dict[str, str]) -> str:
    """Return the canonical word for value (matched without case) from choices."""
    words = ", ".join(sorted(set(choices.values())))
    if not isinstance(value, str):
        raise SpecError(fld, f"must be one of {words}, got {preview(value)}")
    canon = choices.get(value.lower())
    if canon is None:
        close = difflib.get_close_matches(value.lower()[:100], list(choices), n=1, cutoff=0.5)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise SpecError(fld, f"'{preview(value)}' is not one of {words}{hint}")
    return canon


def parse_switch(value: Any, fld: str) -> bool:
    """Return a yes/no spec value: YAML's true or false (no other spelling is guessed at)."""
    if not isinstance(value, bool):
        raise SpecError(fld, f"must be true or false, got {preview(value)}")
    return value
