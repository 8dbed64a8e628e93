"""Spec keys a target declares for itself, beside the generic keys of every layer.

A target that needs a setting no other target uses (the C target's OpenMP threads, the CUDA
target's architectures) declares it here as a SpecOption; the registry hands every target's
options to the spec parser, which accepts the key and its aliases, validates the value with
the option's parser and keeps it with the layer. This module imports no other part of
gncodegen but the errors, so both the spec and the targets can use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class SpecOption:
    """A spec key of one target: its aliases, its default and how its value is checked."""

    key: str                         # snake_case, as in the spec
    aliases: tuple[str, ...]         # accepted spellings besides key (CamelCase)
    default: Any                     # as a spec would give it; parsed like any value
    parse: Callable[[Any, str], Any]  # (value, field name) -> the checked value, or SpecError
    help: str                        # one line for the documentation and `gncodegen show`

    def value(self, layer) -> Any:
        """Return this option's value for a layer (its default where the layer was parsed
        without this option declared)."""
        return layer.option(self.key, self.parse(self.default, self.key))
