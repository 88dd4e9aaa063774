"""Recipient address checking for list import.

Common ASCII addresses are accepted by a regular expression whose language is a
strict subset of what ``email_validator.validate_email(raw,
check_deliverability=False)`` accepts; everything else (including rejections)
is decided by email_validator itself, so the fast path never changes a verdict.

Two keys compare addresses:

- the duplicate key (`AddressCheck.key`): the local part as written (RFC 5321
  2.4: only the receiving host may treat it case-insensitively) and the domain
  casefolded, both as email_validator normalises them (NFC, IDNA U-labels).
  `USER@example.com` and `user@EXAMPLE.com` are duplicates; `USER@example.com`
  and `user@example.com` are not.
- the suppression key (`suppression_key`): the whole normalised address
  casefolded.  Suppression errs on the side of not mailing someone who asked not
  to be mailed, and practically every mailbox provider ignores case anyway.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import email_validator

__all__ = ["AddressCheck", "allow_special_use_domains", "check_address", "special_use_name",
           "suppression_key"]

_LOCAL_PART_MAX = 64
_ADDRESS_MAX = 254

_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
# Labels: letters/digits/hyphens, not starting or ending with a hyphen, at most
# 63 long.  TLD: letters only.  Labels with "--" (Punycode "xn--" and the
# R-LDH labels email_validator rejects) are excluded below and left to it.
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_COMMON_ADDRESS = re.compile(
    rf"(?P<local>{_ATEXT}+(?:\.{_ATEXT}+)*)@(?P<domain>(?:{_LABEL}\.)+(?P<tld>[A-Za-z]{{2,63}}))"
)

# email_validator rejects these special-use names and their subdomains.  Keeping
# only the last label makes the check cheap and, for a name like "home.arpa",
# merely sends more addresses to the validator.
_SPECIAL_USE_TLDS = frozenset(
    name.rsplit(".", 1)[-1].lower() for name in email_validator.SPECIAL_USE_DOMAIN_NAMES
)


# [delivery] allow_special_use_domains: set by the daemon from its config (start, reload)
_allowed_special_use: frozenset[str] = frozenset()
# a stand-in top-level domain that email_validator accepts: an allowed special-use
# suffix is swapped for it, so that everything else about the address is still checked
_STAND_IN = "example"


def allow_special_use_domains(names: list[str]) -> None:
    """Accept addresses on these special-use domains (and their subdomains) from now on."""
    global _allowed_special_use
    _allowed_special_use = frozenset(name.strip(".").lower() for name in names)


def special_use_name(address: str) -> str | None:
    """The special-use name `address`'s domain ends in, if allow_special_use_domains could
    let it through (a dotted domain whose last label is one); else None."""
    domain = address.strip().rpartition("@")[2]
    if "." not in domain or domain.endswith("."):
        return None
    last = domain.rsplit(".", 1)[-1].lower()
    return last if last in _SPECIAL_USE_TLDS else None


class AddressCheck(NamedTuple):
    ok: bool
    address: str  # stripped, as given
    key: str  # duplicate key: local part as is, domain casefolded (normalised); "" when not ok
    reason: str  # "" when ok


def check_address(raw: str) -> AddressCheck:
    address = raw.strip()
    if not address:
        return AddressCheck(False, address, "", "empty email")
    if _is_common_address(address):
        local, _, domain = address.rpartition("@")
        return AddressCheck(True, address, f"{local}@{domain.lower()}", "")
    return _check_with_validator(address)


def suppression_key(raw: str) -> str | None:
    """The whole normalised address casefolded; None if it is not an address."""
    address = raw.strip()
    if _is_common_address(address):
        return address.casefold()
    check = _check_with_validator(address)
    return check.key.casefold() if check.ok else None


def _is_common_address(address: str) -> bool:
    if len(address) > _ADDRESS_MAX:
        return False
    match = _COMMON_ADDRESS.fullmatch(address)
    return (
        match is not None
        and len(match["local"]) <= _LOCAL_PART_MAX
        and "--" not in match["domain"]
        and match["tld"].lower() not in _SPECIAL_USE_TLDS
    )


def _check_with_validator(address: str) -> AddressCheck:
    local, at, domain = address.rpartition("@")
    allowed = _allowed_suffix(domain) if at else None
    checked = f"{local}@{domain[:-len(allowed)]}{_STAND_IN}" if allowed else address
    try:
        validated = email_validator.validate_email(checked, check_deliverability=False)
    except email_validator.EmailNotValidError as exc:
        return AddressCheck(False, address, "", str(exc))
    # The normalised form folds IDNA/Unicode variants of the same mailbox
    # together; for the ASCII addresses of the fast path it equals the input
    # up to the domain's case, so both paths produce the same key.
    normalised = validated.domain.casefold()
    if allowed:
        normalised = normalised[:-len(_STAND_IN)] + allowed
    return AddressCheck(True, address, f"{validated.local_part}@{normalised}", "")


def _allowed_suffix(domain: str) -> str | None:
    """The allowed special-use name `domain` ends in (as a whole label), or None."""
    if not _allowed_special_use:
        return None
    name = special_use_name(domain)  # a bare or dot-ended name is left to the validator's refusal
    return name if name in _allowed_special_use else None
