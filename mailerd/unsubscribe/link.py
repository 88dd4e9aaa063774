"""An unsubscribe link: which campaign and address it names, and whether its token is real.

Pure logic on the key and the link's parts; the HTTP layer (web.py) turns the outcome
into a status code.
"""

from __future__ import annotations

import re
from typing import NamedTuple
from urllib.parse import unquote

from mailerd.message import tokens

CAMPAIGN_PARAM = "c"
ADDRESS_PARAM = "e"

_TOKEN = re.compile(r"[A-Za-z0-9_-]{22}")  # tokens.make: 16 bytes, url-safe base64, no padding
_CAMPAIGN_UID = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_ADDRESS = 320  # RFC 3696 errata: 64 + 1 + 255
_CONTROL = re.compile(r"[\x00-\x20\x7f]")


class Link(NamedTuple):
    campaign_uid: str
    address: str
    token: str


class Incomplete(ValueError):
    """The link lacks a part or a part is malformed (a mail client cut it, or it was typed)."""


def query_values(raw_query: str) -> dict[str, str]:
    """The query's parameters, percent-decoded, the first of each name. A `+` stays a `+`
    (RFC 3986; only HTML forms mean a space by it): a link whose template forgot
    `|urlencode` still names ann+news@example.com, not "ann news@example.com"."""
    values: dict[str, str] = {}
    for pair in raw_query.split("&"):
        name, _, value = pair.partition("=")
        values.setdefault(unquote(name), unquote(value))
    return values


def parse(token: str, query: dict[str, str]) -> Link:
    """The link's parts from the path's token and the query; Incomplete names what is wrong."""
    campaign_uid = query.get(CAMPAIGN_PARAM, "")
    address = query.get(ADDRESS_PARAM, "")
    if not _TOKEN.fullmatch(token):
        raise Incomplete("the token is not 22 url-safe base64 characters")
    if not _CAMPAIGN_UID.fullmatch(campaign_uid):
        raise Incomplete(f"the campaign (query parameter {CAMPAIGN_PARAM!r}) is missing or malformed")
    if not address or len(address) > MAX_ADDRESS or _CONTROL.search(address) or "@" not in address:
        raise Incomplete(f"the address (query parameter {ADDRESS_PARAM!r}) is missing or malformed")
    return Link(campaign_uid, address, token)


def genuine(key: bytes, link: Link) -> bool:
    """True if mailerd made this token for this campaign and address (constant time)."""
    return tokens.verify(key, link.campaign_uid, link.address, link.token)
