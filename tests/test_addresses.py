from __future__ import annotations

import pytest
from email_validator import EmailNotValidError, validate_email
from hypothesis import given, settings
from hypothesis import strategies as st

from mailerd.message.addresses import AddressCheck, _is_common_address, check_address, suppression_key

ATEXT = "abcxyzABCXYZ0189!#$%&'*+/=?^_`{|}~-"
SPECIAL_TLDS = ["local", "localhost", "invalid", "onion", "arpa", "test", "LOCAL", "Test"]

# Realistic pieces plus the edges each rule has to get right: dots in odd
# places, hyphens at label ends, "--" (Punycode and R-LDH), numeric or
# one-letter TLDs, special-use TLDs, label/local/total length limits.
local_atoms = st.one_of(
    st.sampled_from(["john", "Jane", "j", "o'neil", "first.last", "a+tag", "x_y", "UPPER", "123"]),
    st.text(alphabet=ATEXT, min_size=1, max_size=10),
)
local_parts = st.one_of(
    st.lists(local_atoms, min_size=1, max_size=4).map(".".join),
    st.text(alphabet=ATEXT + ".", min_size=0, max_size=12),  # leading/trailing/double dots
    st.integers(60, 70).map(lambda n: "l" * n),
)
labels = st.one_of(
    st.sampled_from(["example", "mail", "sub-domain", "gmail", "co", "xn--bcher-kva", "ab--cd", "a"]),
    st.from_regex(r"[a-zA-Z0-9-]{1,12}", fullmatch=True),
    st.integers(60, 66).map(lambda n: "d" * n),
)
tlds = st.one_of(
    st.sampled_from(["com", "org", "de", "co", "info", "museum", "COM", "c", "c0m", "123"]),
    st.sampled_from(SPECIAL_TLDS),
    st.from_regex(r"[a-zA-Z0-9-]{1,8}", fullmatch=True),
)
domains = st.builds(lambda ls, tld: ".".join([*ls, tld]), st.lists(labels, min_size=0, max_size=4), tlds)


def sized_address(local_length: int, label_length: int, total_length: int, tld: str) -> str:
    """A plain address whose local part, first label and total length are as given."""
    local = "l" * local_length
    label = "d" * label_length
    filler = total_length - len(f"{local}@{label}.{tld}")
    if filler >= 2:
        return f"{local}@{'f' * min(filler - 1, 63)}.{label}.{tld}"
    return f"{local}@{label}.{tld}"


# Addresses straddling each length limit: 64 (local), 63 (label), 254 (total).
sized_addresses = st.builds(
    sized_address, st.integers(62, 66), st.integers(61, 65), st.integers(250, 258), st.sampled_from(["com", "c"])
)


def misplace(address: str, how: str) -> str:
    local, domain = address.split("@")
    first, _, rest = domain.partition(".")
    return {
        "dot first": f".{address}",
        "dot before @": f"{local}.@{domain}",
        "dot after @": f"{local}@.{domain}",
        "hyphen first": f"{local}@-{domain}",
        "hyphen last": f"{local}@{first}-.{rest}",
        "trailing dot": f"{address}.",
        "double dash": f"{local}@{first[:2]}--{first[2:]}.{rest}",
    }[how]


misplaced = st.builds(
    misplace,
    st.sampled_from(["john.doe@mail.example.com", "a@bcd.org", "x+y@ab.co"]),
    st.sampled_from(["dot first", "dot before @", "dot after @", "hyphen first", "hyphen last",
                     "trailing dot", "double dash"]),
)
addresses = st.one_of(
    st.builds(lambda local, domain: f"{local}@{domain}", local_parts, domains),
    sized_addresses,
    misplaced,
)


def validator_accepts(address: str) -> bool:
    try:
        validate_email(address, check_deliverability=False)
    except EmailNotValidError:
        return False
    return True


@settings(max_examples=300, deadline=None)
@given(addresses)
def test_fast_path_accepts_only_what_email_validator_accepts(address: str) -> None:
    if _is_common_address(address):
        validated = validate_email(address, check_deliverability=False)
        assert validated.normalized.casefold() == address.casefold()


@settings(max_examples=300, deadline=None)
@given(addresses)
def test_verdict_always_equals_email_validator(address: str) -> None:
    assert check_address(address).ok == validator_accepts(address)


@pytest.mark.parametrize("address", [
    "john@example.com", "Jane.Doe+news@Mail.Example.ORG", "o'neil@example.ie", "x_y-z@sub.domain.co.uk",
    "a@b.co", "l" * 64 + "@example.com", "{|}~@example.museum",
])
def test_common_addresses_take_the_fast_path(address: str) -> None:
    assert _is_common_address(address)
    local, _, domain = address.rpartition("@")
    assert check_address(address) == AddressCheck(True, address, f"{local}@{domain.casefold()}", "")


@pytest.mark.parametrize("address", [
    "a@b.local", "a@b.localhost", "a@x.onion", "a@b.test", "a@b.invalid", "a@in-addr.arpa",
    "a@xn--bcher-kva.example", "l" * 65 + "@example.com", "a@b.c0m", "a@example",
    "a@" + "d" * 64 + ".com", "a@-b.com", "a@b-.com", ".a@example.com", "a.@example.com",
    "u" * 64 + "@" + "d" * 61 + "." + "d" * 61 + "." + "d" * 62 + ".com",  # 255 characters
])
def test_unusual_addresses_are_left_to_email_validator(address: str) -> None:
    assert not _is_common_address(address)
    assert check_address(address).ok == validator_accepts(address)


@pytest.mark.parametrize(("raw", "reason"), [
    ("", "empty email"),
    ("   \t ", "empty email"),
    ("john.example.com", "must have an @-sign"),
    ("john@doe@example.com", "invalid characters: '@'"),
    ("john doe@example.com", "invalid characters before the @-sign: SPACE"),
    ("john@example.com.", "cannot end with a period"),
    ("john..doe@example.com", "two periods in a row"),
    ("john@localhost", "should have a period"),
    ("john@host.local", "special-use or reserved name"),
])
def test_invalid_addresses_carry_the_reason(raw: str, reason: str) -> None:
    check = check_address(raw)
    assert not check.ok
    assert reason in check.reason
    assert check.key == ""


def test_address_is_stripped_and_duplicate_key_casefolds_the_domain_only() -> None:
    assert check_address("  Bob@Example.COM\n") == AddressCheck(True, "Bob@Example.COM", "Bob@example.com", "")
    assert check_address("USER1@example.com").key == check_address("USER1@EXAMPLE.com").key
    assert check_address("USER1@example.com").key != check_address("user1@example.com").key


def test_key_of_internationalised_address_is_normalised() -> None:
    plain = check_address("a@xn--bcher-kva.example")
    unicode = check_address("a@BÜCHER.example")
    assert plain.ok and unicode.ok
    assert plain.key == unicode.key == "a@bücher.example"
    assert check_address("A@BÜCHER.example").key == "A@bücher.example"


@pytest.mark.parametrize(("a", "b"), [
    ("Bob@Example.COM", "bob@example.com"), ("A@BÜCHER.example", "a@xn--bcher-kva.example"),
    (" x@y.org ", "X@Y.ORG"),
])
def test_suppression_key_casefolds_the_whole_address(a: str, b: str) -> None:
    assert suppression_key(a) == suppression_key(b) is not None
    assert suppression_key(a) == check_address(a).key.casefold()


def test_suppression_key_of_a_non_address_is_none() -> None:
    assert suppression_key("not an address") is None
