"""DKIM on OpenSSL (issue 13 part 2, review L10): our DKIM-Signature equals dkimpy's
byte for byte and verifies, on fixed samples, on rendered campaigns and on generated
messages; a server key rotated on disk is used after SIGHUP; a server key signs only
the From domains listed for it."""

from __future__ import annotations

import base64
import re
import signal
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator
from unittest import mock

import dkim
import dkim.util
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import relay_server, wait_until, write_config
from mailerd.message.dkim import DkimSigner
from mailerd.message.render import Attachment, Renderer, format_date
from mailerd.message.signing import DkimKeyError, Signer, campaign_signer, load_key
from mailerd.schema.control import CampaignSpec, DkimKey
from test_messages import write_campaign

DOMAIN, SELECTOR = "example.org", "s2026"
T = 1_764_590_400  # the t= of the fixed samples: 2025-12-01 12:00 UTC


def _rsa_pem(key: rsa.RSAPrivateKey, form: serialization.PrivateFormat) -> str:
    return key.private_bytes(serialization.Encoding.PEM, form,
                             serialization.NoEncryption()).decode()


RSA_2048 = rsa.generate_private_key(65537, 2048)
RSA_PKCS1 = _rsa_pem(RSA_2048, serialization.PrivateFormat.TraditionalOpenSSL)
RSA_PKCS8 = _rsa_pem(RSA_2048, serialization.PrivateFormat.PKCS8)
ED = ed25519.Ed25519PrivateKey.generate()
ED_SEED = ED.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                           serialization.NoEncryption())
ED_BASE64 = base64.b64encode(ED_SEED).decode() + "\n"  # dknewkey's format
ED_PKCS8 = ED.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
KEYS = {"rsa": RSA_PKCS1, "ed25519": ED_BASE64}
RSA_512 = """-----BEGIN RSA PRIVATE KEY-----
MIIBOwIBAAJBAMOcxPHhquTTIcvwvPwejyJJCZTpEqx4rN/gYSX+iAZqmlcTyfIp
QSX6M/oNFPvYGATCk36v8iSQYvz0dLuA1ycCAwEAAQJAR7JtSU7yiV6Nk6eQTUSS
J/nnRipLiuXMT155nSh3CQpjTlhSbkzBXDcQW52DqGb/8VsVIAQQQlZ0UrhOdOuA
yQIhAO9xT54d40wZn1jyZDHjGv960RHbxhHbC/8chmbIvM2lAiEA0SOPwAjCOba9
bg0mTL5mZ8W7FbrQ5HMuBBjoN7u7T9sCIAve0TSkhK00I/sz4RW8DY2W2CCLhbFC
68BU+LDFyN5lAiEAoHOQDdyqZmz02EHuaGKLXoItDnbNXPehDjOttVSqWJECIQCg
ZSqTaVGhEP6Npw46siKDznjzEPWlTLgTdfNJWRW4fA==
-----END RSA PRIVATE KEY-----
"""


def dns_record(key_text: str) -> bytes:
    """The TXT record of a key (as dkimpy's verify asks for it)."""
    _, key = load_key(key_text)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        raw = key.public_key().public_bytes(serialization.Encoding.Raw,
                                            serialization.PublicFormat.Raw)
        return b"v=DKIM1; k=ed25519; p=" + base64.b64encode(raw)
    der = key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    return b"v=DKIM1; k=rsa; p=" + base64.b64encode(der)


def verifies(message: bytes, keys: dict[str, str], domain: str = DOMAIN) -> bool:
    """dkimpy's verdict, with DNS answered from `keys` (selector -> key text)."""
    def dns(name: bytes, timeout: int = 5) -> bytes | None:
        selector, _, rest = name.decode().partition("._domainkey.")
        if rest != f"{domain}." or selector not in keys:
            return None
        return dns_record(keys[selector])
    return dkim.verify(message, dnsfunc=dns)


@contextmanager
def clock_at(timestamp: int) -> Iterator[None]:
    """dkimpy takes t= from time.time() only; hold it at `timestamp` (plus a fraction)."""
    with mock.patch.object(dkim.time, "time", return_value=timestamp + 0.6):
        yield


def dkimpy_sign(message: bytes, kind: str, include: list[bytes], timestamp: int = T) -> bytes:
    key = RSA_PKCS1.encode() if kind == "rsa" else base64.b64encode(ED_SEED)
    with clock_at(timestamp):
        return dkim.sign(message, SELECTOR.encode(), DOMAIN.encode(), key,
                         canonicalize=(b"relaxed", b"relaxed"),
                         signature_algorithm=b"rsa-sha256" if kind == "rsa" else b"ed25519-sha256",
                         include_headers=list(include))


def signed_names(signed: bytes) -> list[bytes]:
    """The h= list of a signed message's first DKIM-Signature."""
    field = dkim.rfc822_parse(signed)[0][0]
    assert field[0] == b"DKIM-Signature"
    return [h.strip().lower() for h in dkim.util.parse_tag_value(field[1])[b"h"].split(b":")]


def assert_same_as_dkimpy(signed: bytes, unsigned: bytes, kind: str, timestamp: int = T) -> None:
    reference = dkimpy_sign(unsigned, kind, signed_names(signed), timestamp)
    assert signed == reference + unsigned
    assert verifies(signed, {SELECTOR: KEYS[kind]})


# ------------------------------------------------------------------ fixed samples

FOLDED = (b"From: \"News  Desk\" <news@example.org>\r\nTo:  ann@example.com \r\n"
          b"Subject: a  subject\t with\r\n \t runs   of  white space \r\n"
          b"Date: Mon, 01 Dec 2025 12:00:00 +0000\r\nMessage-ID: <a.1@example.org>\r\n"
          b"X-Tag: v\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=\"utf-8\"\r\n"
          b"\r\nLine one  \t \r\n\tindented\tline\r\n\r\ntext   with  runs\r\n\r\n\r\n\r\n")
SAMPLES = {
    "folded headers, white space runs, trailing blank lines": FOLDED,
    "empty body": FOLDED.split(b"\r\n\r\n")[0] + b"\r\n\r\n",
    "no empty line at all": FOLDED.split(b"\r\n\r\n")[0] + b"\r\n",
    "body without a final line end": FOLDED.rstrip(b"\r\n") + b" \t",
    "only blank lines": FOLDED.split(b"\r\n\r\n")[0] + b"\r\n\r\n\r\n\r\n \r\n",
    "UTF-8 headers and body (SMTPUTF8)": ("From: Zoë <zoë@example.org>\r\nTo: chloé@example.com\r\n"
                                          "Subject: Grüße  ★\r\n\r\nHallo Chloé,  ça va?\r\n").encode(),
    "bare LF line ends": FOLDED.replace(b"\r\n", b"\n"),
}


@pytest.mark.parametrize("kind", ["rsa", "ed25519"])
@pytest.mark.parametrize("sample", list(SAMPLES))
def test_fixed_samples_equal_dkimpy_byte_for_byte(kind: str, sample: str) -> None:
    message = SAMPLES[sample]
    signed = Signer(DOMAIN, SELECTOR, KEYS[kind], ("X-Tag",)).sign(message, T)
    assert signed.startswith(b"DKIM-Signature: v=1; a=" + (b"rsa" if kind == "rsa" else b"ed25519"))
    assert_same_as_dkimpy(signed, message, kind)


@pytest.mark.parametrize("kind", ["rsa", "ed25519"])
def test_rendered_campaign_messages_equal_dkimpy_and_one_body_hash_serves_all(kind: str) -> None:
    """Through the Renderer as workers use it: multipart with attachments and List-Unsubscribe,
    personalised and constant bodies, one Signer for the whole campaign (its body hash
    remembered between messages must never leak into a message with another body)."""
    signer = Signer(DOMAIN, SELECTOR, KEYS[kind], ("X-Campaign",))
    personal = Renderer(
        sender="Zoë Müller <news@example.org>", subject="Grüße, {{ name }}",
        text="Hallo {{ name }},\n\nIhr Code:   {{ code }}  \n\n\n", html="<p>Hallo {{ name }}</p>\n",
        columns=["name", "code"], campaign_uid="c1", reply_to="help@example.org",
        headers={"X-Campaign": "nov-{{ code }}"},
        list_unsubscribe_mailto="unsubscribe@example.org",
        list_unsubscribe_url="https://example.org/u/{{ token }}",
        attachments=[Attachment("a.pdf", "application/pdf", bytes(range(256)) * 40)],
        unsubscribe_key=b"k" * 32)
    constant = Renderer(sender="news@example.org", subject="Hello {{ name }}",
                        text="The same text for everyone.\n", html=None, columns=["name", "code"],
                        campaign_uid="c2")
    date = format_date(T)
    rows = [("Ann", "C1"), ("Bob", "C2"), ("Ann", "C1"), ("Chloé", "C3")]
    for renderer in (personal, constant, personal):
        for line, (name, code) in enumerate(rows, 2):
            email = "chloé@example.com" if name == "Chloé" else f"{name.lower()}@example.com"
            message = renderer.render(line=line, email=email, fields=[name, code], date=date,
                                      smtputf8=not email.isascii())
            assert_same_as_dkimpy(signer.sign(message, T + line), message, kind, T + line)


def header_value() -> st.SearchStrategy[bytes]:
    """Field values with white space runs, folding, tabs and non-ASCII (UTF-8) text."""
    word = st.text(st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="\x85\u2028\u2029")
                   | st.sampled_from("\x0b\x0c"), min_size=1, max_size=12).map(lambda s: s.encode())
    space = st.sampled_from([b" ", b"  ", b"\t", b" \t ", b"\r\n ", b"\r\n\t", b" \r\n   "])
    return st.lists(st.tuples(space, word), max_size=8).map(
        lambda parts: b"".join(s + w for s, w in parts))


NAMES = ["From", "To", "Subject", "Date", "Message-ID", "Reply-To", "X-Tag", "x-tag", "Content-Type"]


@st.composite
def messages(draw: st.DrawFn) -> tuple[bytes, list[bytes]]:
    """(message, names to sign): a From among random fields, a body of random lines."""
    names = draw(st.lists(st.sampled_from(NAMES) | st.from_regex(r"[!-9;-~]{1,16}", fullmatch=True),
                          max_size=8))
    names.insert(draw(st.integers(0, len(names))), "From")
    fields = b"".join(n.encode() + b":" + draw(header_value()) + b"\r\n" for n in names)
    line = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"),
                   max_size=30).map(lambda s: s.encode())
    body_lines = draw(st.lists(line | st.sampled_from([b"", b" ", b"\t \t", b"a  \t b  "]), max_size=12))
    ending = draw(st.sampled_from([b"", b"\r\n", b"\r\n\r\n\r\n", b" \r\n \r\n", b"\n"]))
    body = b"\r\n".join(body_lines) + ending
    include = [n.lower().encode() for n in draw(st.lists(st.sampled_from(names), max_size=10))]
    include.insert(draw(st.integers(0, len(include))), b"from")
    return fields + b"\r\n" + body, include


SIGNERS = {kind: DkimSigner(DOMAIN.encode(), SELECTOR.encode(), load_key(KEYS[kind])[1])
           for kind in KEYS}


@pytest.mark.parametrize("kind", ["rsa", "ed25519"])
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sample=messages(), timestamp=st.integers(0, 2_000_000_000))
def test_generated_messages_equal_dkimpy_byte_for_byte(kind: str, sample: tuple[bytes, list[bytes]],
                                                        timestamp: int) -> None:
    message, include = sample
    ours = SIGNERS[kind].signature(message, include, timestamp)
    assert ours == dkimpy_sign(message, kind, include, timestamp)
    from_fields = sum(name.lower() == b"from" for name, _ in dkim.rfc822_parse(message)[0])
    # dkimpy's verify refuses a t= in the future, a From that h= does not cover, and
    # a field name with ";" in h= (RFC 6376 3.2: no ";" in a tag value)
    if timestamp < T and from_fields <= include.count(b"from") and b";" not in b"".join(include):
        assert verifies(ours + message, {SELECTOR: KEYS[kind]})


# ------------------------------------------------------------------ keys


@pytest.mark.parametrize(("text", "algorithm"), [
    (RSA_PKCS1, b"rsa-sha256"), (RSA_PKCS8, b"rsa-sha256"),
    (ED_PKCS8, b"ed25519-sha256"), (ED_BASE64, b"ed25519-sha256"),
    (RSA_PKCS1.replace("\n", "\r\n"), b"rsa-sha256"),
])
def test_every_key_form_signs_what_verifies(text: str, algorithm: bytes) -> None:
    signer = Signer(DOMAIN, SELECTOR, text)
    assert signer.algorithm == algorithm
    assert verifies(signer.sign(FOLDED, T), {SELECTOR: text})


EC_KEY = ec.generate_private_key(ec.SECP256R1()).private_bytes(
    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
    serialization.NoEncryption()).decode()
ENCRYPTED = RSA_2048.private_bytes(
    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
    serialization.BestAvailableEncryption(b"secret")).decode()

TRUNCATED = ("-----BEGIN RSA PRIVATE KEY-----\n"
             + base64.encodebytes(RSA_2048.private_bytes(
                 serialization.Encoding.DER, serialization.PrivateFormat.TraditionalOpenSSL,
                 serialization.NoEncryption())[:300]).decode()
             + "-----END RSA PRIVATE KEY-----\n")


@pytest.mark.parametrize(("text", "expected"), [
    (EC_KEY, "not an RSA or Ed25519 private key"),
    (RSA_512, "the RSA key has 512 bits"),
    (ENCRYPTED, "ENCRYPTED PRIVATE KEY is not supported"),
    ("garbage\n", "not a PEM private key"),
    (RSA_PKCS1.replace("MII", "M*I"), "not valid base64"),
    (TRUNCATED, "not an RSA private key in PKCS#1 form"),
])
def test_unusable_keys_are_refused_without_showing_the_key(text: str, expected: str) -> None:
    with pytest.raises(DkimKeyError) as caught:
        Signer(DOMAIN, SELECTOR, text)
    assert expected in str(caught.value)
    body = "".join(line for line in text.splitlines() if "-----" not in line)
    assert not any(body[i:i + 12] in str(caught.value) for i in range(0, len(body) - 12, 6))


def test_a_server_key_signs_only_its_listed_from_domains() -> None:
    key = DkimKey(domain=DOMAIN, selector=SELECTOR, key=ED_BASE64)

    def spec(sender: str, own: DkimKey | None = None) -> CampaignSpec:
        return CampaignSpec(name="n", sender=sender, subject="s", text="t", dkim=own)

    with pytest.raises(DkimKeyError, match=r"from: 'security@paypal.com'.* servers.isp.dkim_domains"):
        campaign_signer(spec("PayPal <security@paypal.com>"), lambda: key, None,
                        "servers.isp.dkim_domains")
    with pytest.raises(DkimKeyError, match="example.org"):  # the default: the key's own domain only
        campaign_signer(spec("a@news.example.org"), lambda: key)
    assert campaign_signer(spec("News <news@EXAMPLE.org>"), lambda: key) is not None
    assert campaign_signer(spec("a@example.net"), lambda: key, ["example.org", "Example.NET."])
    with pytest.raises(DkimKeyError):
        campaign_signer(spec("a@example.org"), lambda: key, ["example.net"])
    own = DkimKey(domain="paypal.com", selector="s", key=ED_BASE64)  # its own key: its business
    assert campaign_signer(spec("security@paypal.com", own), lambda: key) is not None


# ------------------------------------------------------------------ end to end


def _campaign(directory: Path, sender: str, count: int, extra: list[str] | None = None,
              files: dict[str, str] | None = None) -> tuple[Path, Path]:
    """A personalised text + html campaign from `sender` to user0..user{count-1}@example.com."""
    lines = ['name = "n"', f'from = "{sender}"', 'subject = "Hi {{ name }}"', 'text = "t.txt"',
             'html = "b.html"', *(extra or [])]
    rows = ["email,name"] + [f"user{i}@example.com,Name  {i}" for i in range(count)]
    return write_campaign(directory, lines, rows, {"t.txt": "Dear {{ name }},\n\n  see you   soon \n\n",
                                                   "b.html": "<p>Dear {{ name }}</p>\n", **(files or {})})


FIRST_FIELD = re.compile(rb".*?\r\n(?![ \t])", re.DOTALL)


def _signature_tags(data: bytes) -> dict[bytes, bytes]:
    field = dkim.rfc822_parse(data)[0][0]
    assert field[0] == b"DKIM-Signature"
    return dkim.util.parse_tag_value(field[1])


def test_relay_receives_rsa_2048_signatures_equal_to_dkimpy(tmp_path, relay_factory, daemon_factory):
    relay = relay_factory()
    key_file = tmp_path / "dkim.pem"
    key_file.write_text(RSA_PKCS8)
    daemon = daemon_factory({"isp": relay_server(relay, dkim_domain=DOMAIN, dkim_selector=SELECTOR,
                                                 dkim_key_file=str(key_file))}).start()
    cid = daemon.enqueue(*_campaign(tmp_path / "c", "News <news@example.org>", 6))
    assert daemon.wait_done(cid).counts.sent == 6
    received = relay.messages()
    assert sorted(r.rcpt for r in received) == [f"user{i}@example.com" for i in range(6)]
    for got in received:
        assert verifies(got.data, {SELECTOR: RSA_PKCS8}), got.rcpt
        tags = _signature_tags(got.data)
        assert (tags[b"a"], tags[b"d"], tags[b"s"]) == (b"rsa-sha256", b"example.org", b"s2026")
        unsigned = got.data[FIRST_FIELD.match(got.data).end():]
        assert got.data == dkimpy_sign(unsigned, "rsa", signed_names(got.data),
                                       int(tags[b"t"])) + unsigned


def test_a_key_rotated_on_disk_is_used_after_sighup(tmp_path, relay_factory, daemon_factory):
    relay = relay_factory()
    key_file = tmp_path / "dkim.key"
    key_file.write_text(RSA_PKCS1)
    daemon = daemon_factory({"isp": relay_server(relay, dkim_domain=DOMAIN, dkim_selector="old",
                                                 dkim_key_file=str(key_file))}).start()
    new_rsa = _rsa_pem(rsa.generate_private_key(65537, 2048), serialization.PrivateFormat.PKCS8)

    def send(step: int) -> list[bytes]:
        before = len(relay.messages())
        cid = daemon.enqueue(*_campaign(tmp_path / f"c{step}", "news@example.org", 4))
        assert daemon.wait_done(cid).counts.sent == 4
        return [r.data for r in relay.messages()[before:]]

    def reload(count: int, *needles: str) -> None:
        daemon.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: daemon.log().count(needles[0]) >= count, 20, f"reload {count}")

    for data in send(1):
        assert _signature_tags(data)[b"s"] == b"old" and verifies(data, {"old": RSA_PKCS1})
    # a rotation: the new key (another algorithm, even) in the same file, a new selector
    key_file.write_text(ED_BASE64)
    daemon.config.write_text(daemon.config.read_text().replace('"old"', '"new"'))
    reload(1, "config_reloaded")
    for data in send(2):
        tags = _signature_tags(data)
        assert (tags[b"s"], tags[b"a"]) == (b"new", b"ed25519-sha256")
        assert verifies(data, {"new": ED_BASE64})
    # the file alone changes: read again too
    key_file.write_text(new_rsa)
    reload(2, "config_reloaded")
    for data in send(3):
        assert _signature_tags(data)[b"a"] == b"rsa-sha256"
        assert verifies(data, {"new": new_rsa}) and not verifies(data, {"new": RSA_PKCS1})
    # a key the reload cannot use changes nothing: the daemon signs on with the last good one
    key_file.write_text("not a key\n")
    reload(1, "config_reload_failed")
    assert "servers.isp.dkim_key_file" in daemon.log_line("config_reload_failed")
    for data in send(4):
        assert verifies(data, {"new": new_rsa})
    assert "not a key" not in daemon.log() and new_rsa.splitlines()[1] not in daemon.log()


def test_server_key_refuses_foreign_from_domains_at_enqueue_and_test_send(
        tmp_path, relay_factory, daemon_factory):
    relay = relay_factory()
    key_file = tmp_path / "dkim.key"
    key_file.write_text(ED_BASE64)
    daemon = daemon_factory({"isp": relay_server(
        relay, dkim_domain=DOMAIN, dkim_selector=SELECTOR, dkim_key_file=str(key_file),
        dkim_domains=["example.org", "example.net"])}).start()
    phish = _campaign(tmp_path / "phish", "PayPal Security <security@paypal.com>", 2)
    refused = daemon.ctl("enqueue", str(phish[0]), "--recipients", str(phish[1]), check=False)
    assert refused.returncode in (1, 2)
    assert "from: 'security@paypal.com'" in refused.stderr
    assert "servers.isp.dkim_domains (example.org, example.net)" in refused.stderr
    test_send = daemon.ctl("test-send", str(phish[0]), "--to", "anyone@example.com",
                           "--fields", "name=X", check=False)
    assert test_send.returncode in (1, 2)
    assert "servers.isp.dkim_domains" in test_send.stderr and "Traceback" not in test_send.stderr
    assert relay.messages() == []
    # a listed domain is signed with the server's key; a campaign's own key signs its own domain
    listed = daemon.enqueue(*_campaign(tmp_path / "listed", "news@example.net", 2))
    own = daemon.enqueue(*_campaign(
        tmp_path / "own", "security@paypal.com", 2,
        ['dkim = { domain = "paypal.com", selector = "pp", key_file = "own.key" }'],
        {"own.key": RSA_PKCS1}))
    assert daemon.wait_done(listed).counts.sent == 2 and daemon.wait_done(own).counts.sent == 2
    for got in relay.messages():
        if b"From: news@example.net" in got.data:
            assert verifies(got.data, {SELECTOR: ED_BASE64})
        else:
            assert verifies(got.data, {"pp": RSA_PKCS1}, domain="paypal.com")
    assert len(relay.messages()) == 4


def test_dkim_domains_without_a_key_is_a_config_error(tmp_path, relay_factory, daemon_factory):
    relay = relay_factory()
    daemon = daemon_factory({"isp": relay_server(relay, dkim_domains=["example.org"])})
    result = daemon.start_expecting_failure()
    assert result.returncode != 0
    assert "key servers.isp.dkim_domains: needs dkim_key_file" in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_signature_header_keeps_dkimpy_folding() -> None:
    """Lines of at most 72 characters (the b= value on lines of its own), as dkimpy folds."""
    signed = Signer(DOMAIN, SELECTOR, RSA_PKCS1, ("X-Tag",)).sign(FOLDED, T)
    header = FIRST_FIELD.match(signed)
    assert header is not None and header.group().startswith(b"DKIM-Signature: ")
    lines = header.group().split(b"\r\n")[:-1]
    assert len(lines) > 3 and all(len(line) <= 72 for line in lines)
    assert any(line.lstrip().startswith(b"b=") for line in lines)


@pytest.mark.parametrize("kind", ["rsa", "ed25519"])
def test_a_large_body_is_hashed_in_place_and_equals_dkimpy(kind: str) -> None:
    """Bodies over 1 MiB are not remembered (nor copied); their hash is still dkimpy's."""
    head = FOLDED.split(b"\r\n\r\n")[0] + b"\r\n\r\n"
    lines = base64.encodebytes(bytes(range(256)) * 5000).replace(b"\n", b"\r\n")
    for body in (lines, lines + b"\r\n\r\n", lines.rstrip(b"\r\n"), lines + b"two  spaces\r\n"):
        message = head + body
        signed = Signer(DOMAIN, SELECTOR, KEYS[kind]).sign(message, T)
        assert_same_as_dkimpy(signed, message, kind)


def test_a_dkim_domains_entry_that_is_no_domain_is_a_config_error(tmp_path) -> None:
    from mailerd.config import ConfigError, load_config

    config = write_config(tmp_path / "mailerd.toml", {"servers.isp": {
        "dkim_domain": DOMAIN, "dkim_selector": SELECTOR, "dkim_key_file": "k",
        "dkim_domains": ["example.org", "news@example.net"]}})
    with pytest.raises(ConfigError, match=r"servers.isp.dkim_domains: 'news@example.net' is not a domain"):
        load_config(config)
