"""Text cleaning: one canonical form per document, so equal texts hash equal.

`clean` applies, in order: line breaks to "\\n" (CR LF, CR and the other Unicode line
separators), control characters (category Cc other than "\\n" and "\\t") and lone surrogates
removed, tabs and every other space character (category Zs) to " ", Unicode NFC, runs of
spaces inside a line to one space, trailing spaces of each line dropped, 3+ newlines to 2, and
the ends stripped. Leading indentation is kept (as spaces): it carries meaning in code and verse.
The character classes are built from `unicodedata` once, at import, so they match the running
Python's Unicode version, and each step is one compiled regex or C-level call.
"""

from __future__ import annotations

import re
import unicodedata


def _char_class(chars: list[str]) -> str:
    """Returns a regex character class matching exactly `chars`, as code point ranges."""
    codes = sorted(ord(c) for c in chars)
    ranges: list[tuple[int, int]] = []
    for code in codes:
        if ranges and code == ranges[-1][1] + 1:
            ranges[-1] = (ranges[-1][0], code)
        else:
            ranges.append((code, code))
    parts = [f"\\U{lo:08x}" if lo == hi else f"\\U{lo:08x}-\\U{hi:08x}" for lo, hi in ranges]
    return "[" + "".join(parts) + "]"


# Every Cc, Cs and Zs code point lies in the Basic Multilingual Plane.
_BMP = [chr(c) for c in range(0x10000)]
# Line separators that str.splitlines honours besides \n and \r: VT, FF, FS, GS, RS, NEL, LS.
_LINE_BREAKS = ["\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028"]
_NEWLINE_RE = re.compile(_char_class(_LINE_BREAKS))
_CONTROL_RE = re.compile(
    _char_class(
        [
            c
            for c in _BMP
            if unicodedata.category(c) in ("Cc", "Cs") and c not in "\n\t" + "".join(_LINE_BREAKS)
        ]
    )
)
_SPACE_RE = re.compile(
    _char_class([c for c in _BMP if (unicodedata.category(c) == "Zs" and c != " ") or c == "\t"])
)
del _BMP
# ASCII text (most of it) takes a bytes.translate fast path: same mapping, one C pass.
_ASCII_MAP = bytes.maketrans(b"\t\x0b\x0c\x1c\x1d\x1e", b" \n\n\n\n\n")
_ASCII_DELETE = bytes(
    c
    for c in range(128)
    if unicodedata.category(chr(c)) == "Cc" and c not in (9, 10, 11, 12, 13, 0x1C, 0x1D, 0x1E)
)
_INNER_SPACES_RE = re.compile(r"  +")
_TRAILING_SPACES_RE = re.compile(r"(?m) +$")
_BLANK_LINES_RE = re.compile(r"\n{3,}")


def _collapse_inner(text: str) -> str:
    def one_space(match: re.Match) -> str:
        start = match.start()
        return match.group() if start == 0 or text[start - 1] == "\n" else " "

    return _INNER_SPACES_RE.sub(one_space, text)


def clean(text: str) -> str:
    """Returns `text` in canonical form: NFC, no control characters, normalised whitespace."""
    # Each step is guarded by a substring test, which costs far less than a regex scan.
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if text.isascii():
        text = text.encode("ascii").translate(_ASCII_MAP, _ASCII_DELETE).decode("ascii")
    else:
        text = _NEWLINE_RE.sub("\n", text)
        text = text.replace("\u2029", "\n\n")  # a paragraph separator is a blank line
        text = _CONTROL_RE.sub("", text)
        text = _SPACE_RE.sub(" ", text)
        text = unicodedata.normalize("NFC", text)
    if "  " in text:
        text = _collapse_inner(text)
    if " \n" in text:
        text = _TRAILING_SPACES_RE.sub("", text)
    if "\n\n\n" in text:
        text = _BLANK_LINES_RE.sub("\n\n", text)
    return text.strip()
