"""DKIM signing of rendered messages (RFC 6376; the signing itself in dkim.py).

rsa-sha256 for RSA keys, ed25519-sha256 (RFC 8463) for Ed25519 keys; relaxed/
relaxed canonicalisation. Signed: From, To, Subject, Date, Message-ID, Reply-To,
MIME-Version, Content-Type, List-Unsubscribe(-Post) and the campaign's own
headers, each that is present; From, To, Subject, Reply-To and List-Unsubscribe(-Post)
are signed once more than they occur, so none can be added in transit.

Keys: an RSA key in PEM (PKCS#1 "RSA PRIVATE KEY" or PKCS#8 "PRIVATE KEY"), an
Ed25519 key in PKCS#8 PEM (as `openssl genpkey -algorithm ed25519` writes it), or
the base64 Ed25519 seed that dkimpy's `dknewkey --ktype ed25519` writes. A key is
parsed once, when the Signer is made; its text is never logged or put in an error.

A server's key signs only mail From the domains listed for it (its `dkim_domains`,
by default its own d= domain): anyone allowed to send must not be able to sign
mail from any domain with the organisation's key (review L10).
"""

from __future__ import annotations

import base64
import binascii
import re
import time
from email.utils import parseaddr
from typing import TYPE_CHECKING, Sequence

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_der_private_key

from mailerd.message.dkim import DkimError, DkimSigner, PrivateKey, algorithm_of

if TYPE_CHECKING:
    from typing import Callable

    from mailerd.schema.control import CampaignSpec, DkimKey

__all__ = ["DkimKeyError", "Signer", "campaign_signer", "comparable_domain", "domain_refusal",
           "load_key"]

_PEM = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\s*(.*?)\s*-----END \1-----", re.DOTALL)
_ALWAYS = ("from", "to", "subject", "date", "message-id", "reply-to", "mime-version",
           "content-type", "list-unsubscribe", "list-unsubscribe-post")
_OVERSIGN = (b"from", b"to", b"subject", b"reply-to", b"list-unsubscribe", b"list-unsubscribe-post")
_HEADER_NAME = re.compile(rb"^([!-9;-~]+):", re.MULTILINE)
_SELECTOR = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*")


class DkimKeyError(ValueError):
    """A DKIM key or its parameters are unusable; the message says why (never the key)."""


def load_key(text: str | bytes) -> tuple[bytes, PrivateKey]:
    """(signature algorithm, private key) of a key file's text."""
    data = text.encode("ascii", "replace") if isinstance(text, str) else bytes(text)
    data = data.replace(b"\r\n", b"\n").strip()
    match = _PEM.search(data)
    if match is None:
        try:
            seed = base64.b64decode(b"".join(data.split()), validate=True)
        except (binascii.Error, ValueError):
            seed = b""
        if len(seed) != 32:
            raise DkimKeyError("not a PEM private key, nor a base64 Ed25519 key (32 bytes)")
        key: PrivateKey = ed25519.Ed25519PrivateKey.from_private_bytes(seed)
        return algorithm_of(key), key
    kind = match[1].decode()
    if kind not in ("RSA PRIVATE KEY", "PRIVATE KEY"):
        raise DkimKeyError(f"a {kind} is not supported: use an RSA or Ed25519 private key")
    try:
        der = base64.b64decode(b"".join(match[2].split()), validate=True)
    except (binascii.Error, ValueError):
        raise DkimKeyError(f"the {kind} block is not valid base64") from None
    key = _parse_der(kind, der)
    if isinstance(key, rsa.RSAPrivateKey) and key.key_size < 1024:
        raise DkimKeyError(f"the RSA key has {key.key_size} bits; DKIM verifiers want at least 1024")
    return algorithm_of(key), key


def _parse_der(kind: str, der: bytes) -> PrivateKey:
    if kind == "RSA PRIVATE KEY":  # PKCS#1: the bare RSAPrivateKey, which OpenSSL reads from DER too
        problem = "not an RSA private key in PKCS#1 form"
    else:
        problem = "not an RSA or Ed25519 private key in PKCS#8 form"
    try:
        key = load_der_private_key(der, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise DkimKeyError(problem) from None
    if not isinstance(key, (rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey)):
        raise DkimKeyError(problem)
    return key


def comparable_domain(domain: str) -> str:
    """A domain to compare: lower case, no final dot, IDNA (left as it is when it
    has no IDNA form: then it equals no real domain)."""
    domain = domain.strip().rstrip(".").lower()
    try:
        return domain if domain.isascii() else domain.encode("idna").decode("ascii")
    except UnicodeError:
        return domain


def domain_refusal(sender: str, key_domain: str, listed: Sequence[str] | None,
                   field: str) -> str | None:
    """Why a key for `key_domain` that may sign the `listed` From domains (None: its
    own domain only) must not sign mail from `sender`; None when it may. `field`
    names the setting that lists them."""
    address = parseaddr(sender)[1]
    domain = address.rpartition("@")[2] if "@" in address else ""
    allowed = [comparable_domain(d) for d in (listed if listed is not None else [key_domain])]
    if domain and comparable_domain(domain) in allowed:
        return None
    return (f"from: {address or sender!r}: the domain {domain!r} is not in {field} "
            f"({', '.join(allowed) or 'none'}), so that server's DKIM key may not sign it; "
            f"send from one of those domains, give the campaign its own dkim key, or list "
            f"the domain in {field}")


class Signer:
    def __init__(self, domain: str, selector: str, key_text: str | bytes,
                 extra_headers: tuple[str, ...] = ()) -> None:
        given = domain.strip().rstrip(".")
        try:
            ascii_domain = given.encode("idna") if not given.isascii() else given.encode("ascii")
        except UnicodeError:
            raise DkimKeyError(f"domain {given!r} is not a valid domain name") from None
        if not given or not _SELECTOR.fullmatch(ascii_domain.decode()):
            raise DkimKeyError(f"domain {given!r} is not a valid domain name")
        if not _SELECTOR.fullmatch(selector):
            raise DkimKeyError(f"selector {selector!r} is not a valid selector")
        self.domain = ascii_domain
        self.selector = selector.encode("ascii")
        self.algorithm, key = load_key(key_text)
        self._dkim = DkimSigner(self.domain, self.selector, key)
        # a name with ";" cannot be listed in h= (RFC 6376 3.2): such a header goes unsigned
        self._wanted = tuple(h.encode() for h in dict.fromkeys(
            _ALWAYS + tuple(h.lower() for h in extra_headers if ";" not in h)))

    def __repr__(self) -> str:
        return (f"Signer(domain={self.domain.decode()!r}, selector={self.selector.decode()!r}, "
                f"algorithm={self.algorithm.decode()!r})")

    def sign(self, message: bytes, timestamp: int | None = None) -> bytes:
        """The message with its DKIM-Signature header field prepended (t= now,
        unless `timestamp` is given)."""
        head_end = message.find(b"\r\n\r\n")
        head = message if head_end == -1 else message[:head_end]
        present = {m.lower() for m in _HEADER_NAME.findall(head)}
        include = [h for h in self._wanted if h in present]
        include += [h for h in _OVERSIGN if h in present]
        when = int(time.time()) if timestamp is None else timestamp
        try:
            signature = self._dkim.signature(message, include, when)
        except DkimError as exc:
            raise DkimKeyError(f"dkim: cannot sign: {exc}") from None
        return signature + message


def campaign_signer(spec: CampaignSpec, server_key: Callable[[], DkimKey | None],
                    server_domains: Sequence[str] | None = None,
                    field: str = "the server's dkim_domains") -> Signer | None:
    """The Signer of a campaign's messages: its own key, else its server's (asked
    for only then: reading it may touch the key file), else none. DkimKeyError when
    the server's key may not sign the campaign's From domain (`server_domains`,
    None: the key's own domain; `field` names where they are configured)."""
    key = spec.dkim or server_key()  # the campaign's key wins over the server's
    if key is None:
        return None
    if spec.dkim is None:
        refusal = domain_refusal(spec.sender, key.domain, server_domains, field)
        if refusal is not None:
            raise DkimKeyError(refusal)
    return Signer(key.domain, key.selector, key.key, tuple(spec.headers))
