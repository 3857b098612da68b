"""What dermtool prints to a terminal: text from files made visible, never obeyed.

Messages repeat names and values read from files (an id in a CSV row, a folder's name). A
terminal obeys the control characters among them: an escape sequence in a hand-edited CSV
could clear the screen, retitle the window or hide the rest of the line, and a bidi override
would show the text in another order. rich drops a few of them (BEL, BS, VT, FF, CR) and passes
the rest (ESC, C1's CSI) through, so every console of the CLI is a `Console` that writes them
as the escapes Python's repr uses instead.
"""

from __future__ import annotations

import re

from rich.console import Console as _RichConsole

#: every character of Unicode's categories Cc (C0, DEL, C1), Zl and Zp but newline and tab, and
#: the bidi embedding, override and isolate marks (category Cf), which reorder what follows
_HIDDEN = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """`text` with every control character but newline and tab, every line or paragraph
    separator and every bidi mark written as its escape (ESC as \\x1b, U+202E as \\u202e)."""
    return _HIDDEN.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


class Console(_RichConsole):
    """rich's Console, with every string it renders made `printable` before markup is read: a
    printed message and a table's cells and titles alike (rich turns each through render_str).
    The escapes hold no "[", so escaped markup stays escaped."""

    def render_str(self, text: str, **kwargs):
        return super().render_str(printable(text), **kwargs)
