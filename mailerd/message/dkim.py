"""DKIM-Signature header fields (RFC 6376), relaxed/relaxed, signed by OpenSSL.

The output is byte for byte what dkimpy 1.1 writes for `dkim.sign(message, selector,
domain, key, canonicalize=(b"relaxed", b"relaxed"), include_headers=...)` at the same
second: the same tag order (v a c d i q s t h bh b), the same folding at column 72
(b= folded onto lines of its own), the same parsing of the message (lines end at LF
or CRLF; a header block ends at the first empty line) and the same canonicalisation,
quirks included (a field value is stripped of all ASCII white space, not only WSP).
tests/test_dkim.py holds the two side by side on fixed and generated messages.

What differs is the cost: the RSA (RSASSA-PKCS1-v1_5, SHA-256) or Ed25519 (RFC 8463)
operation runs in OpenSSL through `cryptography`; the regular expressions run only
on text they would change; and the hash of the last body (up to 1 MiB) is kept, so a
campaign whose body carries no merge content (the same bytes for every recipient)
canonicalises and hashes it once per worker. A body that differs per recipient is
hashed per message: SHA-256 runs front to back, and render.py puts the personalised
text and html before the constant attachments, so no hash state of a shared part can
be reused.
"""

from __future__ import annotations

import base64
import hashlib
import re
from typing import Sequence

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa, utils

__all__ = ["DkimError", "DkimSigner", "PrivateKey", "algorithm_of"]

PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey

_HEADER_NAME = b"DKIM-Signature"
_FOLD_AT = 72  # dkimpy's line length, the crlf not counted
_LINE_END = re.compile(rb"\r?\n")
_FIELD_NAME = re.compile(rb"([\x21-\x7e]+?):")
_WSP_RUN = re.compile(rb"[\t ]+")
_WSP_BEFORE_CRLF = re.compile(rb"[\t ]+\r\n")
# dkimpy's RE_BTAG: the b= tag with its value (and folding) taken out, "b=" kept
_FWS = rb"(?:(?:\s*\r?\n)?\s+)?"
_B_VALUE = re.compile(rb"([;\s]b" + _FWS + rb"=)(?:" + _FWS + rb"[a-zA-Z0-9+/=])*(?:\r?\n\Z)?")
# b= holds this while the header is hashed, so that it is folded onto its own line
_B_PLACEHOLDER = b"0" * 60
_PKCS1_SHA256 = (padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))
# a body up to this size is kept to compare the next one with (one per campaign and worker)
_REMEMBERED_BODY_MAX = 1 << 20


class DkimError(ValueError):
    """The message cannot be signed; the message says why."""


def algorithm_of(key: PrivateKey) -> bytes:
    return b"ed25519-sha256" if isinstance(key, ed25519.Ed25519PrivateKey) else b"rsa-sha256"


class DkimSigner:
    """Signs messages for one (domain, selector, key); keeps the last body's hash."""

    def __init__(self, domain: bytes, selector: bytes, key: PrivateKey) -> None:
        self.domain = domain
        self.selector = selector
        self.algorithm = algorithm_of(key)
        self._key = key
        self._tags_before_t = (b"v=1; a=" + self.algorithm + b"; c=relaxed/relaxed; d=" + domain
                               + b"; i=@" + domain + b"; q=dns/txt; s=" + selector + b"; t=")
        self._last_body: tuple[bytes, bytes] | None = None  # (body as given, bh=)

    def signature(self, message: bytes, include: Sequence[bytes], timestamp: int) -> bytes:
        """The DKIM-Signature header field (ending in CRLF) of `message`, signing the
        header fields named in `include` (lower case, in order; a name listed more
        often than it occurs signs its absence) at `timestamp` (t=)."""
        if b"from" not in include:
            raise DkimError("the From header field must be signed")
        fields, body_start = split_message(message)
        head = (self._tags_before_t + str(timestamp).encode("ascii") + b"; h="
                + b" : ".join(include) + b"; bh=" + self._body_hash(message, body_start) + b"; b=")
        digest = hashlib.sha256()
        for name, value in select_fields(fields, include):
            digest.update(name.lower().rstrip() + b":" + relaxed_value(value) + b"\r\n")
        digest.update(b"dkim-signature:" + relaxed_value(without_b_value(fold(head + _B_PLACEHOLDER))))
        signed = base64.b64encode(self._sign(digest.digest()))
        return _HEADER_NAME + b": " + fold(head + signed + b"\r\n")

    def _body_hash(self, message: bytes, start: int) -> bytes:
        if len(message) - start > _REMEMBERED_BODY_MAX:  # hashed where it lies, never copied
            return _base64_sha256(canonical_body(message, start))
        body = message[start:]
        last = self._last_body
        if last is not None and last[0] == body:
            return last[1]
        body_hash = _base64_sha256(canonical_body(body))
        self._last_body = (body, body_hash)
        return body_hash

    def _sign(self, digest: bytes) -> bytes:
        if isinstance(self._key, ed25519.Ed25519PrivateKey):
            return self._key.sign(digest)  # RFC 8463: Ed25519 over the SHA-256 hash
        return self._key.sign(digest, *_PKCS1_SHA256)


# ------------------------------------------------------------------ the message

def split_message(message: bytes) -> tuple[list[tuple[bytes, bytes]], int]:
    """(header fields as (name, value with its line ends), where the body starts),
    as dkimpy's rfc822_parse reads them."""
    end, body_start = _header_block_end(message)
    head = message[:end]
    lines = head.split(b"\r\n") if head.count(b"\n") == head.count(b"\r\n") else _LINE_END.split(head)
    if lines[-1] == b"":  # what follows the last line end
        lines.pop()
    fields: list[tuple[bytes, bytes]] = []
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            if not fields:
                raise DkimError("the message starts with a continuation line")
            name, value = fields[-1]
            fields[-1] = (name, value + line + b"\r\n")
            continue
        match = _FIELD_NAME.match(line)
        if match is not None:
            fields.append((match[1], line[match.end():] + b"\r\n"))
        elif not line.startswith(b"From "):
            raise DkimError(f"not a header field line: {line[:40]!r}")
    return fields, len(message) if body_start is None else body_start


def _header_block_end(message: bytes) -> tuple[int, int | None]:
    """(end of the header lines, start of the body or None when there is no empty line)."""
    for empty_line in (b"\r\n", b"\n"):
        if message.startswith(empty_line):
            return 0, len(empty_line)
    candidates = [(at + 1, at + 1 + len(rest)) for rest in (b"\r\n", b"\n")
                  if (at := message.find(b"\n" + rest)) != -1]
    if not candidates:
        return len(message), None
    return min(candidates)


def relaxed_value(value: bytes) -> bytes:
    """A field value in relaxed form (RFC 6376 3.4.2) as dkimpy makes it: line ends
    taken out, white space runs made one space, then bytes.strip() (which strips VT
    and FF too). The regular expressions run only when there is something for them."""
    unfolded = value.replace(b"\r\n", b"")
    if b"\n" in unfolded:
        unfolded = _LINE_END.sub(b"", value)
    if b"\t" in unfolded or b"  " in unfolded:
        unfolded = _WSP_RUN.sub(b" ", unfolded)
    return unfolded.strip()


def without_b_value(folded: bytes) -> bytes:
    """The signature field's value with the b= value (and its folding) taken out."""
    if folded.count(b"b=") == 1:  # then b= is the last tag: everything after it is its value
        return folded[:folded.rfind(b"b=") + 2]
    return _B_VALUE.sub(rb"\1", folded)


def select_fields(fields: list[tuple[bytes, bytes]], include: Sequence[bytes]
                  ) -> list[tuple[bytes, bytes]]:
    """For each name in `include` (lower case), the last instance of that field not
    yet taken (RFC 6376 5.4.2); none once they are all taken."""
    positions: dict[bytes, list[int]] = {}
    for index, (name, _) in enumerate(fields):
        positions.setdefault(name.lower().rstrip(), []).append(index)
    chosen = []
    for wanted in include:
        left = positions.get(wanted)
        if left:
            chosen.append(fields[left.pop()])
    return chosen


def canonical_body(message: bytes, start: int = 0) -> bytes | memoryview:
    """Relaxed (RFC 6376 3.4.4) of the body message[start:], as dkimpy does it (a bare
    LF is a line end too). Usually only empty lines at the end go: then it is a view
    of `message`, not a copy."""
    if (message.count(b"\n", start) != message.count(b"\r\n", start)
            or message.find(b"\t", start) != -1 or message.find(b"  ", start) != -1
            or message.find(b" \r\n", start) != -1):
        return _canonical_body_rewritten(message[start:])
    end = len(message)
    while message.endswith(b"\r\n", start, end):
        end -= 2
    if end == len(message):  # no line end at the end: one is added
        return message[start:] + b"\r\n" if end > start else b""
    return b"" if end == start else memoryview(message)[start:end + 2]


def _canonical_body_rewritten(body: bytes) -> bytes:
    if body.count(b"\n") != body.count(b"\r\n"):
        body = _LINE_END.sub(b"\r\n", body)
    if b" \r\n" in body or b"\t\r\n" in body:
        body = _WSP_BEFORE_CRLF.sub(b"\r\n", body)
    if b"\t" in body or b"  " in body:
        body = _WSP_RUN.sub(b" ", body)
    end = len(body)
    while body.endswith(b"\r\n", 0, end):
        end -= 2
    body = body + b"\r\n" if end == len(body) else body[:end + 2]
    return b"" if body == b"\r\n" else body


def _base64_sha256(data: bytes | memoryview) -> bytes:
    return base64.b64encode(hashlib.sha256(data).digest())


def fold(value: bytes) -> bytes:
    """dkimpy's fold() for the DKIM-Signature value: lines of at most 72 characters
    with the field name, broken at the last space that fits, else anywhere."""
    width = _FOLD_AT - len(_HEADER_NAME)
    if len(value) <= width:
        return value
    if len(value) - value.rfind(b"\r\n") == 2 and len(value) <= width + 2:
        return value
    folded_until = value.rfind(b"\r\n ")
    done = b""
    if folded_until != -1:
        done, value = value[:folded_until + 3], value[folded_until + 3:]
    while len(value) > width:
        space = value[:width].rfind(b" ")
        if space == -1:
            done += value[:width] + b"\r\n "
            value = value[width:]
        else:
            done += value[:space] + b"\r\n "
            value = value[space + 1:]
        width = _FOLD_AT - 1
    return done + value
