"""mailerd against a real Postfix (Debian's package) with its ordinary anvil limits (issue 12).

The relay is a private instance (tests/postfix.py) on loopback: STARTTLS with a
certificate from a CA made here and given to mailerd as `tls_ca_file`, AUTH through
Postfix SASL with Dovecot's auth service, 2 sessions per client and 40 messages per
10 s, one recipient refused with 550 and one deferred with 450. It relays to the
test's sink, which counts what arrived.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import write_config
from mailerd.testing.relay import FakeRelay
from mailerd.testing.waiting import wait_until
from postfix import TLS_NAME, PrivatePostfix, missing

WHY_NOT = missing()
needs_postfix = pytest.mark.skipif(WHY_NOT is not None, reason=WHY_NOT or "")

MESSAGES = 160
RATE_LIMIT, RATE_WINDOW = 40, 10.0
USER, PASSWORD = "relayuser", "S3cret-relay-pw"
REFUSED, DEFERRED = "refuse@example.com", "later@example.com"


@pytest.fixture
def sink():
    relay = FakeRelay()
    relay.start()
    yield relay
    relay.stop()


@pytest.fixture
def postfix(sink):
    relay = PrivatePostfix(sink.port, users={USER: PASSWORD}, settings={
        "smtpd_client_connection_count_limit": "2",
        "smtpd_client_message_rate_limit": str(RATE_LIMIT),
        "anvil_rate_time_unit": f"{RATE_WINDOW:g}s",
    }, recipient_access={
        REFUSED: "550 5.1.1 <refuse@example.com>: Recipient address rejected: no such user here",
        DEFERRED: "450 4.2.0 <later@example.com>: Recipient address rejected: mailbox busy",
    })
    try:
        relay.start()
        yield relay
    finally:
        relay.stop()
        relay.remove()


def postfix_server(relay: PrivatePostfix, tmp_path: Path, **extra: object) -> dict[str, object]:
    secret = tmp_path / "relay.secret"
    secret.write_text(PASSWORD + "\n")
    assert relay.ca_file is not None
    return {"host": "127.0.0.1", "port": relay.port, "security": "starttls",
            "tls_ca_file": str(relay.ca_file), "tls_server_name": TLS_NAME,
            "username": USER, "password_file": str(secret), "connections": 4, "timeout": "10s",
            **extra}


@needs_postfix
def test_postfix_anvil_limits_all_arrive_once_no_attempts_charged(tmp_path, sink, postfix,
                                                                   daemon_factory):
    daemon = daemon_factory({"postfix": postfix_server(postfix, tmp_path)},
                            delivery={"retry_initial": "1h", "retry_max": "1h",
                                      "max_attempts": 3}).start()
    extra = [f"{REFUSED},Refused,R1", f"{DEFERRED},Later,L1"]
    started = time.monotonic()
    cid = daemon.send_campaign(tmp_path / "c", MESSAGES, extra_rows=extra)
    report = wait_until(
        lambda: (r := daemon.report(cid)).counts.sent + r.counts.failed + r.counts.deferred
        == MESSAGES + 2 and r, 180, "every recipient to be resolved")
    elapsed = time.monotonic() - started
    wait_until(lambda: sum(sink.count_by_rcpt().values()) >= MESSAGES, 30, "Postfix to relay it all")

    arrived = sink.count_by_rcpt()
    assert set(arrived) == {f"user{i}@example.com" for i in range(MESSAGES)}
    assert set(arrived.values()) == {1}, "each arrived once"
    rows = {r.email: r for state in ("sent", "failed", "deferred")
            for r in daemon.report(cid, state).recipients or []}
    assert rows[REFUSED].state == "failed" and rows[REFUSED].code == 550
    assert rows[DEFERRED].state == "deferred" and rows[DEFERRED].code == 450
    charged = {email: r.attempts for email, r in rows.items() if r.attempts != 1}
    assert not charged, f"attempts charged for the relay's limits: {charged}"
    assert report.counts.sent == MESSAGES

    rate_refusals = postfix.count("Message delivery request rate limit exceeded")
    session_refusals = postfix.count("Connection concurrency limit exceeded")
    messages = MESSAGES + 2
    floor = messages / RATE_LIMIT * RATE_WINDOW
    print(f"\npostfix: {messages} messages in {elapsed:.1f}s (floor {floor:.1f}s, "
          f"{elapsed / floor:.2f}x); refusals: {rate_refusals} rate, {session_refusals} session")
    assert rate_refusals + session_refusals <= messages // 10, "mailerd slows down instead of hammering"
    assert elapsed <= 1.5 * floor
    # the mail went over TLS, authenticated
    assert postfix.count(f"sasl_method=PLAIN, sasl_username={USER}") >= 1
    assert postfix.count("TLS connection established from localhost") >= 1
    status = daemon.status().servers[0]
    assert status.effective_connections <= 2


@needs_postfix
def test_certificate_name_checked_and_never_plaintext(tmp_path, sink, postfix, daemon_factory):
    """The wrong name, or no CA, stops the session before AUTH or MAIL; nothing is sent."""
    daemon = daemon_factory({
        "wrongname": postfix_server(postfix, tmp_path, tls_server_name="other.test", connections=1),
        "noca": {k: v for k, v in postfix_server(postfix, tmp_path, connections=1).items()
                 if k != "tls_ca_file"},
    }).start()
    cid = daemon.send_campaign(tmp_path / "c", 3)
    daemon.log_line("session_backoff", "server=wrongname", "STARTTLS", "other.test", timeout=30)
    daemon.log_line("session_backoff", "server=noca", "CERTIFICATE_VERIFY_FAILED", timeout=30)
    assert daemon.report(cid).counts.sent == 0
    assert not sink.count_by_rcpt()
    assert postfix.count("sasl_username") == 0
    assert postfix.count("from=<") == 0  # no MAIL FROM was ever accepted


def check_config(tmp_path: Path, server: dict[str, object]) -> subprocess.CompletedProcess[str]:
    config = write_config(tmp_path / "mailerd.toml", {
        "daemon": {"state_dir": str(tmp_path / "state")}, "servers.isp": server})
    return subprocess.run([sys.executable, "-m", "mailerd", "--check-config", "--config", str(config)],
                          capture_output=True, text=True, timeout=60)


def test_plaintext_auth_is_a_config_error_unless_allowed(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("pw\n")
    server = {"host": "127.0.0.1", "port": 2525, "username": "me", "password_file": str(secret)}
    refused = check_config(tmp_path, server)
    assert refused.returncode != 0
    assert "servers.isp" in refused.stderr and "plaintext" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert check_config(tmp_path, {**server, "allow_plaintext_auth": True}).returncode == 0
    assert check_config(tmp_path, {**server, "security": "starttls"}).returncode == 0


def test_a_bad_ca_file_is_named(tmp_path):
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    base = {"host": "127.0.0.1", "port": 2525, "security": "starttls"}
    missing_file = check_config(tmp_path, {**base, "tls_ca_file": str(tmp_path / "none.pem")})
    assert missing_file.returncode != 0
    assert "servers.isp.tls_ca_file" in missing_file.stderr and "none.pem" in missing_file.stderr
    junk = check_config(tmp_path, {**base, "tls_ca_file": str(tmp_path / "junk.pem")})
    assert junk.returncode != 0 and "not a PEM bundle" in junk.stderr
    no_tls = check_config(tmp_path, {"host": "127.0.0.1", "tls_server_name": "relay.test"})
    assert no_tls.returncode != 0 and "servers.isp.tls_server_name" in no_tls.stderr


@needs_postfix
def test_implicit_tls_checked_against_tls_server_name(tmp_path, sink, postfix, daemon_factory):
    daemon = daemon_factory({"smtps": postfix_server(postfix, tmp_path, security="tls",
                                                     port=postfix.tls_port, connections=1)}).start()
    cid = daemon.send_campaign(tmp_path / "c", 5)
    daemon.wait_done(cid, timeout=60)
    assert daemon.report(cid).counts.sent == 5
    wait_until(lambda: len(sink.count_by_rcpt()) == 5, 30, "Postfix to relay the 5 messages")
    assert set(sink.count_by_rcpt().values()) == {1}
    assert postfix.count(f"sasl_username={USER}") >= 1
