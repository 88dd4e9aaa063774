"""What text from outside may carry into a message: checks on header values, on the
header lines the email package folded, on merge values bound for a body, and on
attachment file names.

Each check returns why a value is unusable, or None.  They are pure functions of
the text, so the renderer (at send time), the enqueue row check and mailerctl
(preview, test-send) all refuse the same values with the same words.

Why the folded bytes are checked and not only the values: the email package
decodes RFC 2047 encoded words while parsing a header and, on interpreters
without the CVE-2024-6923 fix (gh-121650; CPython < 3.11.10, < 3.12.5), writes
a decoded CR/LF back out raw, so `=?utf-8?q?x=0D=0ABcc:_y?=` becomes a Bcc
header.  A value can be clean and still fold into an unsafe line; what counts is
the bytes produced.
"""

from __future__ import annotations

import email._encoded_words as _ew
import re

__all__ = [
    "describe_char",
    "encoded_word_problem",
    "file_name_problem",
    "folded_header_problem",
    "header_value_problem",
    "merge_value_problem",
]

_C0_NAMES = ("NUL SOH STX ETX EOT ENQ ACK BEL BS TAB LF VT FF CR SO SI DLE DC1 DC2 DC3 DC4 "
             "NAK SYN ETB CAN EM SUB ESC FS GS RS US").split()
_OTHER_NAMES = {"\x7f": "DEL", "\x85": "NEL", "\u2028": "LINE SEPARATOR",
                "\u2029": "PARAGRAPH SEPARATOR"}


def describe_char(char: str) -> str:
    """`'\\x1b' (ESC)`: a control character as an error message names it."""
    name = _C0_NAMES[ord(char)] if ord(char) < 0x20 else _OTHER_NAMES.get(char)
    return f"{char!r} ({name})" if name else repr(char)


# Anything str.splitlines splits on (the email package raises on these, or emits
# them raw), the other C0 controls and DEL.  Tab is folding white space: allowed.
_FORBIDDEN_IN_HEADER = re.compile("[\x00-\x08\x0a-\x1f\x7f\x85\u2028\u2029]")

# In a body a merge value may hold tab and line breaks (a multi-line address from
# a CSV field): the body encoder turns every line break into CRLF.  The other C0
# controls and DEL would go out raw in a 7bit body (NUL is forbidden by RFC 5322;
# ESC sequences are terminal escapes), so they are refused.
_FORBIDDEN_IN_VALUE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")

_FORBIDDEN_IN_FILE_NAME = re.compile("[\x00-\x1f\x7f\x85\u2028\u2029/]")


def _control_problem(pattern: re.Pattern[str], value: str, where: str) -> str | None:
    bad = pattern.search(value)
    if bad is None:
        return None
    return f"control character {describe_char(bad.group())} is not allowed in {where}"


def merge_value_problem(value: str) -> str | None:
    """Why a merge value may not go into a message at all (a body included)."""
    return _control_problem(_FORBIDDEN_IN_VALUE, value, "a merge value")


def file_name_problem(name: str) -> str | None:
    """Why an attachment's file name cannot go into its Content-Disposition header."""
    if not name.strip():
        return "the file name is empty"
    return _control_problem(_FORBIDDEN_IN_FILE_NAME, name, "a file name")


# ------------------------------------------------------------------ encoded words

# An encoded word as email._header_value_parser finds one: "=?", a charset without
# "?", the encoding, "?", then anything up to the first "?=".  The parser tolerates
# white space inside and words of any length, so this does too.
_ENCODED_WORD_START = re.compile(r"=\?[^?]*\?[qQbB]\?")
# RFC 2047 allows 75 characters.  Longer look-alikes are refused instead of decoded,
# which bounds the work a hostile value full of "=?" can cause.
MAX_ENCODED_WORD = 200


def encoded_word_problem(value: str) -> str | None:
    """Why a header value holding RFC 2047 encoded words is unsafe: one decodes (as
    the email package would decode it) to a control character.

    Every "=?" is tried as a start, overlapping ones included, because the parser
    may skip an invalid word and then decode one that starts inside it.
    """
    if "=?" not in value:
        return None
    position = value.find("=?")
    while position != -1:
        start = _ENCODED_WORD_START.match(value, position)
        if start is not None:
            end = value.find("?=", start.end())
            if end == -1:
                return None  # no later start can be closed either
            word = value[position:end + 2]
            if len(word) > MAX_ENCODED_WORD:
                return (f"holds an RFC 2047 encoded word of {len(word)} characters "
                        f"(at most {MAX_ENCODED_WORD} are accepted)")
            problem = _decoded_word_problem(word)
            if problem is not None:
                return problem
        position = value.find("=?", position + 2)
    return None


def _decoded_word_problem(word: str) -> str | None:
    try:
        decoded = _ew.decode(word)[0]
    except (ValueError, KeyError, LookupError):
        return None  # the email package leaves it as literal text (checked as such)
    bad = _FORBIDDEN_IN_HEADER.search(decoded)
    if bad is None:
        return None
    return (f"the RFC 2047 encoded word {word[:60]!r} decodes to control character "
            f"{describe_char(bad.group())}")


def header_value_problem(value: str) -> str | None:
    """Why a value (rendered, before folding) may not go into a header."""
    return (_control_problem(_FORBIDDEN_IN_HEADER, value, "a header")
            or encoded_word_problem(value))


# ------------------------------------------------------------------ folded output

# In a folded header (without its final CRLF): a CR not before LF, an LF not after
# CR, a CRLF not followed by folding white space (it would start a new header or
# end the header block), or any other control but tab.
_UNSAFE_IN_FOLDED = re.compile(rb"\r(?!\n)|(?<!\r)\n|\r\n(?![ \t])|[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
# A continuation line of nothing but white space: some parsers take it for the
# blank line that ends the header block.
_BLANK_CONTINUATION = re.compile(rb"\r\n[ \t]*(?:\r\n|\Z)")


def folded_header_problem(folded: bytes) -> str | None:
    """Why a folded header line (name, value, every fold, the final CRLF) is unsafe."""
    if not folded.endswith(b"\r\n"):
        return "the folded header does not end with CRLF"
    inner = folded[:-2]
    bad = _UNSAFE_IN_FOLDED.search(inner)
    if bad is not None:
        found = bad.group()
        if found.startswith(b"\r\n"):
            return "a line break not followed by white space would start a new header"
        if found == b"\r":
            return "the folded header holds a bare CR"
        if found == b"\n":
            return "the folded header holds a bare LF"
        return f"the folded header holds control character {describe_char(found.decode())}"
    if _BLANK_CONTINUATION.search(inner):
        return "a blank continuation line could end the header block"
    return None
