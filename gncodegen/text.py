"""User text in messages and in generated comments: bounded previews and unsafe characters.

A value from a spec may be huge (YAML aliases share one list many times over) or hold
characters that change how the line around it reads (a newline, a Unicode bidirectional
override). Messages show a preview built under a character budget, so formatting a value never
costs more than the budget; text that generated code repeats in comments must pass
check_comment_safe.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any

PREVIEW_CHARS = 40
# The C99 trigraph for a backslash: in a comment, ??/ before the end of a line splices the
# next line in (the other trigraphs change nothing there).
TRIGRAPH = re.compile(r"\?\?/")


def preview(value: Any, limit: int = PREVIEW_CHARS) -> str:
    """Return a one-line ASCII rendering of a user value, at most limit characters long.

    Lists and mappings are walked only as far as the budget reaches, so a value that
    aliases expand to millions of entries costs no more than a short one.
    """
    parts: list[str] = []
    budget = [limit + 1]        # one past the limit: enough to know the text was cut

    def put(text: str) -> bool:
        parts.append(text[: budget[0]])
        budget[0] -= len(text)
        return budget[0] > 0

    def walk(item: Any, depth: int) -> bool:
        if isinstance(item, str):
            return put(escape(item[: budget[0] + 1]) if depth == 0 else
                       ascii(item[: budget[0] + 1]))
        if isinstance(item, (list, tuple)):
            if depth > 8 or not put("["):
                return put("...")
            for i, element in enumerate(item):
                if (i and not put(", ")) or not walk(element, depth + 1):
                    return False
            return put("]")
        if isinstance(item, dict):
            if depth > 8 or not put("{"):
                return put("...")
            for i, (key, element) in enumerate(item.items()):
                if ((i and not put(", ")) or not walk(key, depth + 1) or not put(": ")
                        or not walk(element, depth + 1)):
                    return False
            return put("}")
        if isinstance(item, bool) or item is None:       # as YAML writes them
            return put("null" if item is None else str(item).lower())
        if isinstance(item, (int, float)):
            if isinstance(item, int) and item.bit_length() > 512:
                return put(f"<an integer of {item.bit_length()} bits>")
            return put(repr(item))
        return put(f"<{type(item).__name__}>")

    walk(value, 0)
    text = "".join(parts)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def escape(text: str) -> str:
    """Return text with every character outside printable ASCII as a Python escape."""
    return text.encode("unicode_escape", errors="backslashreplace").decode("ascii")


def unsafe_char(text: str) -> str | None:
    """Return the first character of text that is not safe to show, else None.

    Unsafe: control characters, Unicode format characters (bidirectional overrides and
    isolates, zero-width characters), line and paragraph separators, spaces other than
    U+0020, private-use and unassigned code points, and lone surrogates (the bytes of a file
    name that is not UTF-8).
    """
    for ch in text:
        if not ch.isprintable():
            return ch
    return None


def describe_char(ch: str) -> str:
    """Return a character as a message shows it: an escape and, when it has one, its name."""
    if 0xDC80 <= ord(ch) <= 0xDCFF:
        return f"byte 0x{ord(ch) - 0xDC00:02x}, which is not UTF-8"
    if ord(ch) < 32 or ord(ch) == 127:
        return f"control character {escape(ch)}"
    name = unicodedata.name(ch, "")
    kind = {"Cf": "a Unicode format character that can reorder or hide text",
            "Zl": "a line separator", "Zp": "a paragraph separator",
            "Zs": "a space other than U+0020", "Co": "a private-use character",
            "Cn": "an unassigned code point", "Cs": "a lone surrogate",
            "Cc": "a control character"}.get(unicodedata.category(ch), "not printable")
    return f"U+{ord(ch):04X}{f' ({name})' if name else ''}, {kind}"


def comment_problem(text: str) -> str | None:
    """Return why text cannot be repeated inside a generated C comment, else None."""
    bad = unsafe_char(text)
    if bad is not None:
        return f"holds {describe_char(bad)}"
    for seq in ("*/", "/*"):
        if seq in text:
            return (f"holds '{seq}', which would end or nest the C comment that names it in "
                    "the generated code")
    found = TRIGRAPH.search(text)
    if found:
        return f"holds '{found.group()}', the C trigraph for a backslash"
    return None


def counted(n: int, word: str) -> str:
    """Return `1 group`, `2 groups`: a count and its noun, singular for one."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"
