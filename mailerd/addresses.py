# TEMPORARY placeholder for smoke testing; helper-1 replaces this file.
from typing import NamedTuple
from email_validator import validate_email, EmailNotValidError
class AddressCheck(NamedTuple):
    ok: bool
    address: str
    key: str
    reason: str
def check_address(raw: str) -> AddressCheck:
    a = raw.strip()
    if not a:
        return AddressCheck(False, a, "", "empty email")
    try:
        validate_email(a, check_deliverability=False)
    except EmailNotValidError as e:
        return AddressCheck(False, a, "", str(e))
    return AddressCheck(True, a, a.casefold(), "")
