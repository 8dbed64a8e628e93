"""A spec's YAML: read under the YAML 1.2 core schema, bounded in nesting and in size.

The document is built straight from the parser's events (libyaml's when PyYAML has it), never
through PyYAML's constructors, so that:

* plain scalars resolve as YAML 1.2's core schema says: integers are ``[-+]?[0-9]+``, ``0o...``
  and ``0x...``; floats are ``1.5``, ``1e-5``, ``.inf``, ``-.inf`` and ``.nan`` (any digits,
  an optional exponent); booleans are true and false (also True/TRUE, False/FALSE); null is
  ``~``, ``null`` or nothing; everything else is a string. YAML 1.1's surprises are gone:
  ``1:0`` is not 60, ``1_0`` is not 10, ``yes`` and ``on`` are not booleans. A decimal integer
  with a leading zero (``010``) is refused: YAML 1.1 reads it as octal 8 and YAML 1.2 as 10,
  so the writer meant one of two numbers; write ``10`` or ``0o10``;
* merge keys (``<<: *defaults``, or a list of mappings) merge as YAML 1.1's merge type says:
  keys written in the mapping win, then earlier merged mappings over later ones;
* the only tags are those of plain data (``!!str``, ``!!int``, ``!!float``, ``!!bool``,
  ``!!null``, ``!!seq``, ``!!map``); any other is refused, so a spec never builds an object;
* an alias of a node inside itself (``&a [*a]``) is refused, and aliases are counted each time
  they are used: past MAX_VALUES values in all the document is refused, so a few hundred bytes
  of nested aliases cannot ask for a billion; nesting deeper than MAX_DEPTH is refused;
* a key must be a scalar, and a mapping may not hold the same key twice.

Every refusal is a SpecError naming the place in the document (``layers[1].scale[3]``).
"""

from __future__ import annotations

import math
import re
from typing import Any

import yaml

from .errors import SpecError
from .text import preview

# Nesting deeper than any spec needs (a spec is about five levels deep).
MAX_DEPTH = 32
# Values in the document, aliases counted each time they are used: 2^20 is 256 times the
# 4096 channels of the widest normalization layers in common networks, more than a file of
# a hundred such layers with every parameter inline; a million-channel layer keeps its
# parameters in a .npy file. Reading that many takes a few seconds.
MAX_VALUES = 1 << 20

_T = "tag:yaml.org,2002:"
_STR, _INT, _FLOAT, _BOOL, _NULL = (_T + t for t in ("str", "int", "float", "bool", "null"))
_COLLECTION_TAGS = {None, "!", _T + "seq", _T + "map"}

_NULL_WORDS = {"", "~", "null", "Null", "NULL"}
_BOOL_WORDS = {"true": True, "True": True, "TRUE": True,
               "false": False, "False": False, "FALSE": False}
# YAML 1.2 core schema numbers, one alternative per kind (the group name says which).
_NUMBER = re.compile(r"(?P<dec>[-+]?[0-9]+)|(?P<oct>0o[0-7]+)|(?P<hex>0x[0-9a-fA-F]+)"
                     r"|(?P<float>[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?)"
                     r"|(?P<inf>[-+]?\.(?:inf|Inf|INF))|(?P<nan>\.(?:nan|NaN|NAN))")
_NUMBER_START = frozenset("0123456789+-.")
_LEADING_ZERO = re.compile(r"[-+]?0[0-9]")
_MERGE = object()   # the key of a merge (plain `<<`)


def load_yaml(text: str) -> Any:
    """Return the data of one YAML document (None when there is none); raise SpecError."""
    loader = (yaml.CBaseLoader if getattr(yaml, "__with_libyaml__", False) else
              yaml.BaseLoader)(text)
    try:
        return _Builder(loader).document()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        if "maximum nesting depth" in str(exc.problem):   # libyaml's own limit, past ours
            line = f" (line {mark.line + 1})" if mark else ""
            raise SpecError("spec", f"nested more than {MAX_DEPTH} levels deep{line}") from None
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise SpecError("spec", f"YAML syntax error{where}: {exc.problem}") from None
    except yaml.YAMLError as exc:
        raise SpecError("spec", f"YAML error: {preview(str(exc).splitlines()[0], 120)}"
                        ) from None
    finally:
        loader.dispose()


def _line(event) -> str:
    mark = getattr(event, "start_mark", None)
    return f"line {mark.line + 1}" if mark is not None else "?"


def path_text(path: list) -> str:
    """Return a place in the document as a field name: ``layers[1].scale[3]``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + preview(part, 40)
    return out if len(out) <= 100 else out[:97] + "..."


class _Frame:
    """A list or mapping being built."""

    __slots__ = ("value", "is_map", "anchor", "size", "key", "at_key", "seen", "merges")

    def __init__(self, is_map: bool, anchor: str | None):
        self.value: Any = {} if is_map else []
        self.is_map = is_map
        self.anchor = anchor
        self.size = 1           # values in it, itself included
        self.key: Any = None
        self.at_key = True      # a mapping expects a key next
        self.seen: set = set()  # its keys as (type, value), so 1 and true stay distinct
        self.merges: list[dict] = []


class _Builder:
    """Builds the document from parser events, one event at a time."""

    def __init__(self, loader):
        self.loader = loader
        self.stack: list[_Frame] = []
        self.anchors: dict[str, Any] = {}   # name -> open _Frame, or (value, size) once built
        self.total = 0

    def fail(self, rule: str, path: list | None = None) -> SpecError:
        where = path_text(self.path() if path is None else path)
        return SpecError(where or "spec", rule)

    def field(self) -> list:
        """Return the path up to its last key: the field a structural error is in."""
        path = self.path()
        while path and isinstance(path[-1], int):
            path.pop()
        return path

    def path(self) -> list:
        out: list = []
        for frame in self.stack:
            if not frame.is_map:
                out.append(len(frame.value))
            elif frame.at_key:
                break
            else:
                out.append("<<" if frame.key is _MERGE else frame.key)
        return out

    def document(self) -> Any:
        events = self.loader
        events.get_event()                          # StreamStart
        if events.check_event(yaml.StreamEndEvent):
            return None
        events.get_event()                          # DocumentStart
        value = self.node()
        events.get_event()                          # DocumentEnd
        if not events.check_event(yaml.StreamEndEvent):
            raise SpecError("spec", "a spec file holds one YAML document; found another "
                                    f"({_line(events.peek_event())})")
        return value

    def node(self) -> Any:
        """Build the next node of the stream and return its value."""
        get = self.loader.get_event
        stack = self.stack
        while True:
            event = get()
            kind = type(event)
            if kind is yaml.ScalarEvent:
                value, size = self.scalar(event), 1
            elif kind is yaml.AliasEvent:
                value, size = self.alias(event)
            elif kind is yaml.SequenceStartEvent or kind is yaml.MappingStartEvent:
                self.open(event)
                continue
            else:                                   # the end of a list or mapping
                value, size = self.close()
            if not stack:
                return value
            self.add(value, size, event)

    def count(self, size: int) -> None:
        self.total += size
        if self.total > MAX_VALUES:
            raise self.fail(f"the spec expands to more than {MAX_VALUES} values (an alias "
                            "counts its anchor's values each time it is used)", self.field())

    def open(self, event) -> None:
        is_map = isinstance(event, yaml.MappingStartEvent)
        parent = self.stack[-1] if self.stack else None
        if parent is not None and parent.is_map and parent.at_key:
            kind = "mapping" if is_map else "list"
            raise self.fail(f"the key at {_line(event)} is a {kind}; keys must be names")
        if event.tag not in _COLLECTION_TAGS:
            raise self.tag_error(event)
        if len(self.stack) >= MAX_DEPTH:
            raise self.fail(f"nested more than {MAX_DEPTH} levels deep ({_line(event)})",
                            self.field())
        self.count(1)
        frame = _Frame(is_map, event.anchor)
        if event.anchor is not None:
            self.anchors[event.anchor] = frame
        self.stack.append(frame)

    def close(self) -> tuple[Any, int]:
        frame = self.stack.pop()
        for source in frame.merges:         # keys written here win, then earlier sources
            for key, value in source.items():
                frame.value.setdefault(key, value)
        if frame.anchor is not None and self.anchors.get(frame.anchor) is frame:
            self.anchors[frame.anchor] = (frame.value, frame.size)
        return frame.value, frame.size

    def add(self, value: Any, size: int, event) -> None:
        """Put a finished value into the innermost open list or mapping."""
        frame = self.stack[-1]
        frame.size += size
        if not frame.is_map:
            frame.value.append(value)
            return
        if frame.at_key:
            if isinstance(value, (list, dict)):
                raise self.fail(f"the key at {_line(event)} is an alias of a "
                                f"{'mapping' if isinstance(value, dict) else 'list'}; keys "
                                "must be names")
            marker = _MERGE if value is _MERGE else (type(value), value)
            frame.key, frame.at_key = value, False
            if marker in frame.seen:
                raise self.fail(f"key given twice ({_line(event)})")
            frame.seen.add(marker)
            return
        if frame.key is _MERGE:
            sources = value if isinstance(value, list) else [value]
            if not sources or not all(isinstance(s, dict) for s in sources):
                raise self.fail("the merge key << takes a mapping or a list of mappings, got "
                                f"{preview(value)}")
            frame.merges.extend(sources)
        else:
            frame.value[frame.key] = value
        frame.key, frame.at_key = None, True

    def alias(self, event) -> tuple[Any, int]:
        target = self.anchors.get(event.anchor)
        if target is None:
            raise self.fail(f"alias *{preview(event.anchor)} at {_line(event)} has no anchor "
                            "before it")
        if isinstance(target, _Frame):
            raise self.fail(f"alias *{preview(event.anchor)} at {_line(event)} is used inside "
                            "its own anchor (a recursive structure); specs are finite",
                            self.field())
        value, size = target
        self.count(size)
        return value, size

    def scalar(self, event) -> Any:
        self.count(1)
        text, tag = event.value, event.tag
        frame = self.stack[-1] if self.stack else None
        if tag is None and event.implicit[0]:
            if text == "<<" and frame is not None and frame.is_map and frame.at_key:
                value: Any = _MERGE
            else:
                value = self.resolve(text, event)
        elif tag in (None, "!", _STR):
            value = text
        elif tag in (_INT, _FLOAT, _BOOL, _NULL):
            value = self.resolve(text, event, tag)
        else:
            raise self.tag_error(event)
        if event.anchor is not None:
            self.anchors[event.anchor] = ("<<" if value is _MERGE else value, 1)
        return value

    def resolve(self, text: str, event, tag: str | None = None) -> Any:
        """Return a plain scalar's value under the YAML 1.2 core schema (or as tag says)."""
        found = _NUMBER.fullmatch(text) if text[:1] in _NUMBER_START else None
        kind = found.lastgroup if found else None
        if tag is None or tag in (_INT, _FLOAT):
            if kind == "dec":
                if _LEADING_ZERO.match(text):
                    raise self.fail(f"'{preview(text)}' has a leading zero, which YAML 1.1 "
                                    "reads as octal and YAML 1.2 as decimal; write it without "
                                    "the zero (or 0o... for octal)")
                try:
                    number = int(text)
                except ValueError:              # past Python's digit limit
                    raise self.fail(f"an integer of {len(text)} digits is too long") from None
                return float(number) if tag == _FLOAT else number
            if kind in ("oct", "hex"):
                number = int(text[2:], 8 if kind == "oct" else 16)
                return float(number) if tag == _FLOAT else number
        if tag is None or tag == _FLOAT:
            if kind == "float":
                return float(text)
            if kind == "inf":
                return -math.inf if text[0] == "-" else math.inf
            if kind == "nan":
                return math.nan
        if tag in (None, _NULL) and text in _NULL_WORDS:
            return None
        if tag in (None, _BOOL) and text in _BOOL_WORDS:
            return _BOOL_WORDS[text]
        if tag is None:
            return text
        raise self.fail(f"'{preview(text)}' is not a YAML 1.2 {tag.rsplit(':', 1)[-1]} "
                        f"({_line(event)})")

    def tag_error(self, event) -> SpecError:
        tag = str(event.tag).replace(_T, "!!")
        return self.fail(f"tag '{preview(tag, 60)}' at {_line(event)} is not allowed: specs "
                         "are plain YAML (no tags that build objects)")
