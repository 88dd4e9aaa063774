"""DKIM signing of rendered messages (RFC 6376, with dkimpy).

rsa-sha256 for RSA keys, ed25519-sha256 (RFC 8463) for Ed25519 keys; relaxed/
relaxed canonicalisation. Signed: From, To, Subject, Date, Message-ID, Reply-To,
MIME-Version, Content-Type, List-Unsubscribe(-Post) and the campaign's own
headers, each that is present; From, To, Subject, Reply-To and List-Unsubscribe(-Post)
are signed once more than they occur, so none can be added in transit.

Keys: an RSA key in PEM (PKCS#1 "RSA PRIVATE KEY" or PKCS#8 "PRIVATE KEY"), an
Ed25519 key in PKCS#8 PEM (as `openssl genpkey -algorithm ed25519` writes it), or
the base64 Ed25519 seed that dkimpy's `dknewkey --ktype ed25519` writes. A key is
parsed once, when the Signer is made; its text is never logged or put in an error.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Callable

    from mailerd.schema.control import CampaignSpec, DkimKey

# dkimpy (and the dnspython it pulls in) is imported where a key is loaded or a
# message signed: a worker of a server without DKIM never carries it (4 MB each).

__all__ = ["KeyError_", "Signer", "campaign_signer", "load_key"]

_PEM = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\s*(.*?)\s*-----END \1-----", re.DOTALL)
# DER of a PKCS#8 Ed25519 private key (RFC 8410) up to the 32-byte seed.
_ED25519_PKCS8_PREFIX = bytes.fromhex("302e020100300506032b657004220420")
_ALWAYS = ("from", "to", "subject", "date", "message-id", "reply-to", "mime-version",
           "content-type", "list-unsubscribe", "list-unsubscribe-post")
_OVERSIGN = (b"from", b"to", b"subject", b"reply-to", b"list-unsubscribe", b"list-unsubscribe-post")
_HEADER_NAME = re.compile(rb"^([!-9;-~]+):", re.MULTILINE)
_SELECTOR = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*")


class KeyError_(ValueError):
    """A DKIM key or its parameters are unusable; the message says why (never the key)."""


def load_key(text: str | bytes) -> tuple[bytes, bytes]:
    """(signature algorithm, private key in the form dkimpy takes) of a key file's text."""
    data = text.encode("ascii", "replace") if isinstance(text, str) else bytes(text)
    data = data.replace(b"\r\n", b"\n").strip()
    match = _PEM.search(data)
    if match is None:
        try:
            seed = base64.b64decode(b"".join(data.split()), validate=True)
        except (binascii.Error, ValueError):
            seed = b""
        if len(seed) != 32:
            raise KeyError_("not a PEM private key, nor a base64 Ed25519 key (32 bytes)")
        return b"ed25519-sha256", base64.b64encode(seed)
    kind = match[1].decode()
    try:
        der = base64.b64decode(b"".join(match[2].split()), validate=True)
    except (binascii.Error, ValueError):
        raise KeyError_(f"the {kind} block is not valid base64") from None
    if kind == "PRIVATE KEY" and der.startswith(_ED25519_PKCS8_PREFIX) and len(der) == 48:
        return b"ed25519-sha256", base64.b64encode(der[len(_ED25519_PKCS8_PREFIX):])
    if kind not in ("RSA PRIVATE KEY", "PRIVATE KEY"):
        raise KeyError_(f"a {kind} is not supported: use an RSA or Ed25519 private key")
    pem = (f"-----BEGIN {kind}-----\n".encode() + base64.encodebytes(der)
           + f"-----END {kind}-----\n".encode())
    import dkim.crypto

    try:
        key = dkim.crypto.parse_pem_private_key(pem)
    except dkim.crypto.UnparsableKeyError:
        raise KeyError_("not an RSA private key in PKCS#1 or PKCS#8 form") from None
    bits = key["modulus"].bit_length()
    if bits < 1024:
        raise KeyError_(f"the RSA key has {bits} bits; DKIM verifiers want at least 1024")
    return b"rsa-sha256", pem


class Signer:
    def __init__(self, domain: str, selector: str, key_text: str | bytes,
                 extra_headers: tuple[str, ...] = ()) -> None:
        domain = domain.strip().rstrip(".")
        try:
            self.domain = domain.encode("idna") if not domain.isascii() else domain.encode("ascii")
        except UnicodeError:
            raise KeyError_(f"domain {domain!r} is not a valid domain name") from None
        if not domain or not _SELECTOR.fullmatch(self.domain.decode()):
            raise KeyError_(f"domain {domain!r} is not a valid domain name")
        if not _SELECTOR.fullmatch(selector):
            raise KeyError_(f"selector {selector!r} is not a valid selector")
        self.selector = selector.encode("ascii")
        self.algorithm, self._key = load_key(key_text)
        self._wanted = tuple(h.encode() for h in dict.fromkeys(
            _ALWAYS + tuple(h.lower() for h in extra_headers)))

    def __repr__(self) -> str:
        return (f"Signer(domain={self.domain.decode()!r}, selector={self.selector.decode()!r}, "
                f"algorithm={self.algorithm.decode()!r})")

    def sign(self, message: bytes) -> bytes:
        """The message with its DKIM-Signature header field prepended."""
        head = message.split(b"\r\n\r\n", 1)[0]
        present = {m.lower() for m in _HEADER_NAME.findall(head)}
        include = [h for h in self._wanted if h in present]
        include += [h for h in _OVERSIGN if h in present]
        import dkim

        try:
            signature = dkim.sign(
                message, self.selector, self.domain, self._key,
                canonicalize=(b"relaxed", b"relaxed"), signature_algorithm=self.algorithm,
                include_headers=include,
            )
        except dkim.DKIMException as exc:
            raise KeyError_(f"dkim: cannot sign: {exc}") from None
        return signature + message


def campaign_signer(spec: CampaignSpec, server_key: Callable[[], DkimKey | None]) -> Signer | None:
    """The Signer of a campaign's messages: its own key, else its server's (asked
    for only then: reading it may touch the key file), else none."""
    dkim = spec.dkim or server_key()  # the campaign's key wins over the server's
    return None if dkim is None else Signer(dkim.domain, dkim.selector, dkim.key,
                                            tuple(spec.headers))
