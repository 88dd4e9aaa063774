"""VERP: an envelope sender per recipient, so a bounce names whom it is about.

A campaign (or a server) may set `return_path = "bounces+{{ tag }}@example.org"`.
Each recipient's MAIL FROM is then that address with `{{ tag }}` replaced by
`<campaign uid>-<line>-<mac>`, where mac is HMAC-SHA256 of the state directory's
key (the one of tokens.py) over "verp:<campaign uid>:<line>", cut to 50 bits and
written in lowercase base32 (10 characters). Lowercase digits, letters and "-"
only: the tag survives MTAs that fold the local part's case, and a forged or
damaged tag is refused by `parse_tag`, so a forged bounce cannot suppress anyone.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from typing import NamedTuple

from mailerd.schema.config import return_path_problem

PLACEHOLDER = re.compile(r"\{\{\s*tag\s*\}\}")
MAC_CHARS = 10
__all__ = ["Tagged", "make_tag", "return_path", "find_tag", "return_path_problem"]
_TAG = re.compile(r"([0-9a-f]{16})-([0-9]{1,12})-([a-z2-7]{%d})" % MAC_CHARS)


class Tagged(NamedTuple):
    campaign_uid: str
    line: int


def _mac(key: bytes, campaign_uid: str, line: int) -> str:
    digest = hmac.new(key, f"verp:{campaign_uid}:{line}".encode("ascii"), hashlib.sha256).digest()
    return base64.b32encode(digest).decode("ascii").lower()[:MAC_CHARS]


def make_tag(key: bytes, campaign_uid: str, line: int) -> str:
    return f"{campaign_uid}-{line}-{_mac(key, campaign_uid, line)}"


def return_path(template: str, key: bytes, campaign_uid: str, line: int) -> str:
    """The envelope sender of recipient `line` of the campaign."""
    return PLACEHOLDER.sub(make_tag(key, campaign_uid, line), template)


def find_tag(key: bytes, text: str) -> Tagged | None:
    """The first authentic tag in `text` (an address a bounce was sent to); forged ones are skipped."""
    for match in _TAG.finditer(text.lower()):
        uid, line, mac = match.group(1), int(match.group(2)), match.group(3)
        if hmac.compare_digest(_mac(key, uid, line), mac):
            return Tagged(uid, line)
    return None
