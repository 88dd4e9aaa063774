"""Per-recipient unsubscribe tokens.

A token is HMAC-SHA256(key, "<campaign uid>:<address casefolded>"), truncated to
128 bits and written url-safe base64 without padding (22 characters). The key is
`unsubscribe.key` in the state directory, made at the daemon's first start (mode
0600) and handed to the workers; it is never logged. Whoever runs the unsubscribe
endpoint checks a token with `verify(key, campaign_uid, address, token)`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from pathlib import Path

KEY_FILE = "unsubscribe.key"
KEY_BYTES = 32
TOKEN_BYTES = 16


def load_or_create_key(state_dir: Path) -> bytes:
    """The state directory's key; created (0600, atomically) when there is none."""
    path = Path(state_dir) / KEY_FILE
    try:
        key = path.read_bytes()
    except FileNotFoundError:
        key = secrets.token_bytes(KEY_BYTES)
        temporary = path.with_name(f".{KEY_FILE}.{os.getpid()}")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, key)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(temporary, path)  # never replaces a key another process made first
        except FileExistsError:
            key = path.read_bytes()
        finally:
            os.unlink(temporary)
    return _checked(path, key)


def read_key(path: Path) -> bytes:
    """A key the daemon made (its state directory's KEY_FILE, or a copy), never a new one:
    for the unsubscribe endpoint, which must verify the daemon's tokens."""
    return _checked(path, Path(path).read_bytes())


def _checked(path: Path, key: bytes) -> bytes:
    if len(key) < 16:
        raise ValueError(f"{path}: an unsubscribe key must have at least 16 bytes")
    return key


def make(key: bytes, campaign_uid: str, address: str) -> str:
    message = f"{campaign_uid}:{address.strip().casefold()}".encode("utf-8")
    digest = hmac.new(key, message, hashlib.sha256).digest()[:TOKEN_BYTES]
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def verify(key: bytes, campaign_uid: str, address: str, token: str) -> bool:
    """True if `token` is the one mailerd put in that campaign's mail to `address`."""
    return hmac.compare_digest(make(key, campaign_uid, address).encode(), token.encode("utf-8", "replace"))
