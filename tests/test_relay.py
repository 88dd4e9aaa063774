"""Tests for mailerd.testing.relay.FakeRelay.

The client is aiosmtplib; raw asyncio streams are used where the exact moment
of a server-side close matters.  No fixed sleeps: every wait is a condition
with a deadline.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import aiosmtplib
import pytest

from mailerd.testing.relay import FakeRelay, Faults
from mailerd.testing.waiting import wait_until

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[1]
DEADLINE = 5.0
SENDER = "sender@client.test"

# --------------------------------------------------------------------------- helpers


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def client(relay: FakeRelay, timeout: float = DEADLINE) -> aiosmtplib.SMTP:
    return aiosmtplib.SMTP(
        hostname="127.0.0.1",
        port=relay.port,
        start_tls=False,
        use_tls=False,
        local_hostname="client.test",
        timeout=timeout,
    )


def message(n: int, body: str = "hello") -> str:
    return f"Message-ID: <{n}@client.test>\r\nSubject: test {n}\r\n\r\n{body}\r\n"


async def connected(relay: FakeRelay, timeout: float = DEADLINE) -> aiosmtplib.SMTP:
    smtp = client(relay, timeout)
    await smtp.connect()
    return smtp


async def send_one(relay: FakeRelay, rcpts: list[str], n: int = 1) -> None:
    smtp = await connected(relay)
    await smtp.sendmail(SENDER, rcpts, message(n))
    await smtp.quit()


def wait(relay: FakeRelay, predicate: Callable[[FakeRelay], bool]) -> None:
    assert relay.wait_for(predicate, DEADLINE), "relay condition not reached before deadline"


async def await_relay(relay: FakeRelay, predicate: Callable[[FakeRelay], bool]) -> None:
    await asyncio.to_thread(wait, relay, predicate)


class Raw:
    """Minimal line-level SMTP client for checking exactly when the relay closes."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, relay: FakeRelay) -> tuple[Raw, bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
        raw = cls(reader, writer)
        return raw, await raw.reply()

    async def reply(self) -> bytes:
        return await asyncio.wait_for(self.reader.readline(), DEADLINE)

    async def cmd(self, line: str) -> bytes:
        self.writer.write(line.encode() + b"\r\n")
        await self.writer.drain()
        return await self.reply()

    async def envelope(self, rcpt: str = "rcpt@example.test") -> None:
        assert (await self.cmd("HELO client.test")).startswith(b"250 ")
        assert (await self.cmd(f"MAIL FROM:<{SENDER}>")).startswith(b"250")
        assert (await self.cmd(f"RCPT TO:<{rcpt}>")).startswith(b"250")

    async def closed_without_reply(self) -> bool:
        """True if the relay closes the connection without sending anything more."""
        try:
            rest = await asyncio.wait_for(self.reader.read(), DEADLINE)
        except ConnectionResetError:
            return True
        return rest == b""

    def close(self) -> None:
        self.writer.close()


@pytest.fixture(autouse=True)
def no_noisy_logs(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """The relay must not log warnings or tracebacks for its deliberate faults."""
    caplog.set_level(logging.WARNING)
    yield
    gc.collect()  # surfaces "Task exception was never retrieved"
    noisy = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not noisy, [r.getMessage() for r in noisy]


@pytest.fixture
def relay() -> Iterator[FakeRelay]:
    with FakeRelay() as r:
        yield r


# --------------------------------------------------------------------------- basics


def test_records_one_entry_per_rcpt_for_many_messages_per_session(relay: FakeRelay) -> None:
    async def scenario() -> None:
        smtp = await connected(relay)
        for n in range(20):
            errors, reply = await smtp.sendmail(SENDER, ["a@example.test", "B@example.test"], message(n, ".dot"))
            assert errors == {} and reply.startswith("2.0.0")
            await smtp.rset()
        await smtp.quit()

    run(scenario())
    got = relay.messages()
    assert len(got) == 40 and relay.message_count == 20
    assert relay.count_by_rcpt() == {"a@example.test": 20, "b@example.test": 20}
    assert {e.session for e in got} == {1}
    assert got[0].mail_from == SENDER and got[0].rcpt == "a@example.test"
    assert got[0].data == message(0, ".dot").encode()  # dot-stuffing undone
    assert relay.received == got
    assert relay.sessions_opened == 1 and relay.drops == 0


def test_large_body_is_accepted(relay: FakeRelay) -> None:
    body = ("x" * 998 + "\r\n") * 6000  # ~6 MB, RFC-sized lines
    run(send_one_body(relay, body))
    (entry,) = relay.messages()
    assert len(entry.data) > 6_000_000 and entry.data.endswith(b"x\r\n")


async def send_one_body(relay: FakeRelay, body: str) -> None:
    smtp = await connected(relay)
    await smtp.sendmail(SENDER, ["big@example.test"], f"Subject: big\r\n\r\n{body}")
    await smtp.quit()


def test_data_size_limit() -> None:
    with FakeRelay(data_size_limit=1000) as relay:
        with pytest.raises(aiosmtplib.SMTPSenderRefused) as info:  # aiosmtplib sends SIZE=
            run(send_one_body(relay, "y" * 500 + "\r\n" + "z" * 600 + "\r\n"))
        assert info.value.code == 552

        async def without_size_hint() -> None:
            smtp = await connected(relay)
            await smtp.mail(SENDER)
            await smtp.rcpt("big@example.test")
            with pytest.raises(aiosmtplib.SMTPDataError) as info:
                await smtp.data("Subject: big\r\n\r\n" + ("z" * 600 + "\r\n") * 2)
            assert info.value.code == 552
            await smtp.quit()

        run(without_size_hint())
        assert relay.messages() == []


def test_refuses_non_loopback_hosts() -> None:
    for host in ("0.0.0.0", "192.168.1.10", "::", "example.com"):
        with pytest.raises(ValueError):
            FakeRelay(host=host)
    assert FakeRelay(host="localhost").host == "127.0.0.1"


def test_invalid_faults_rejected() -> None:
    with pytest.raises(ValueError):
        FakeRelay(Faults(drop_after=-1))
    with pytest.raises(ValueError):
        FakeRelay(Faults(quota_reply="quota\r\nexceeded"))


def test_concurrent_sessions_are_counted_exactly(relay: FakeRelay) -> None:
    async def worker(w: int) -> None:
        smtp = await connected(relay)
        for n in range(5):
            await smtp.sendmail(SENDER, [f"user{w}@example.test", "shared@example.test"], message(n))
        await smtp.quit()

    async def scenario() -> None:
        await asyncio.gather(*(worker(w) for w in range(20)))

    run(scenario())
    counts = relay.count_by_rcpt()
    assert relay.message_count == 100 and counts["shared@example.test"] == 100
    assert all(counts[f"user{w}@example.test"] == 5 for w in range(20))
    assert relay.sessions_opened == 20 and 1 <= relay.max_concurrent_seen <= 20
    wait(relay, lambda r: r.active_sessions == 0)
    assert len({e.session for e in relay.messages()}) == 20


# --------------------------------------------------------------------------- greeting faults


def test_greeting_421() -> None:
    with FakeRelay(Faults(greeting_421=True)) as relay:
        with pytest.raises(aiosmtplib.SMTPConnectResponseError) as info:
            run(connected(relay))
        assert info.value.code == 421
        assert relay.sessions_refused == 1 and relay.sessions_opened == 0


def test_max_sessions() -> None:
    async def scenario(relay: FakeRelay) -> None:
        first, second = await connected(relay), await connected(relay)
        with pytest.raises(aiosmtplib.SMTPConnectResponseError) as info:
            await connected(relay)
        assert info.value.code == 421 and "Too many concurrent SMTP connections" in info.value.message
        await first.quit()
        await await_relay(relay, lambda r: r.active_sessions == 1)
        third = await connected(relay)  # a slot is free again
        await third.sendmail(SENDER, ["a@example.test"], message(1))
        await second.quit()
        await third.quit()

    with FakeRelay(Faults(max_sessions=2)) as relay:
        run(scenario(relay))
        assert relay.sessions_opened == 3 and relay.sessions_refused == 1
        assert relay.max_concurrent_seen == 2 and relay.message_count == 1


# --------------------------------------------------------------------------- close faults


def test_drop_after_k_messages_on_a_session() -> None:
    async def scenario(relay: FakeRelay) -> None:
        smtp = await connected(relay)
        for n in range(2):  # the K-th message still gets its 250
            errors, _ = await smtp.sendmail(SENDER, ["a@example.test"], message(n))
            assert errors == {}
        with pytest.raises(aiosmtplib.SMTPServerDisconnected):
            await smtp.rset()
        await send_one(relay, ["b@example.test"])  # a new session is fine

    with FakeRelay(Faults(drop_after=2)) as relay:
        run(scenario(relay))
        assert relay.message_count == 3
        assert relay.drop_reasons == {"drop_after": 1}
        assert [e.session for e in relay.messages()] == [1, 1, 2]


def test_drop_after_closes_right_after_the_250() -> None:
    async def scenario(relay: FakeRelay) -> None:
        raw, greeting = await Raw.open(relay)
        assert greeting.startswith(b"220 ")
        await raw.envelope()
        assert (await raw.cmd("DATA")).startswith(b"354")
        assert (await raw.cmd("Subject: x\r\n\r\nbody\r\n.")).startswith(b"250 ")
        raw.writer.write(b"RSET\r\n")
        assert await raw.closed_without_reply()
        raw.close()

    with FakeRelay(Faults(drop_after=1)) as relay:
        run(scenario(relay))
        assert relay.message_count == 1 and relay.drops == 1


def test_close_mid_data_every_nth_data() -> None:
    body = "\r\n".join(f"line {i}" for i in range(200))

    async def attempt(relay: FakeRelay, n: int) -> bool:
        smtp = await connected(relay)
        try:
            await smtp.sendmail(SENDER, [f"r{n}@example.test"], message(n, body))
        except aiosmtplib.SMTPServerDisconnected:
            return False
        await smtp.quit()
        return True

    async def scenario(relay: FakeRelay) -> list[bool]:
        return [await attempt(relay, n) for n in range(1, 5)]

    with FakeRelay(Faults(close_mid_data_every=2)) as relay:
        assert run(scenario(relay)) == [True, False, True, False]
        assert relay.count_by_rcpt() == {"r1@example.test": 1, "r3@example.test": 1}
        assert relay.drop_reasons == {"close_mid_data": 2}


def test_close_mid_data_closes_after_354_before_the_dot() -> None:
    async def scenario(relay: FakeRelay) -> None:
        raw, _ = await Raw.open(relay)
        await raw.envelope()
        assert (await raw.cmd("DATA")).startswith(b"354")
        raw.writer.write(b"Subject: cut\r\n")  # first body line only, no final dot
        assert await raw.closed_without_reply()
        raw.close()

    with FakeRelay(Faults(close_mid_data_every=1)) as relay:
        run(scenario(relay))
        assert relay.messages() == [] and relay.drops == 1


def test_swallow_every_nth_message() -> None:
    async def scenario(relay: FakeRelay) -> None:
        smtp = await connected(relay)
        await smtp.sendmail(SENDER, ["a@example.test"], message(1))
        with pytest.raises(aiosmtplib.SMTPServerDisconnected):
            await smtp.sendmail(SENDER, ["a@example.test", "b@example.test"], message(2))
        # line level: the whole message incl. the dot goes in, nothing comes back
        raw, _ = await Raw.open(relay)
        await raw.envelope("c@example.test")
        assert (await raw.cmd("DATA")).startswith(b"354")
        assert (await raw.cmd("Subject: 3\r\n\r\nbody\r\n.")).startswith(b"250 ")  # 3rd: accepted
        await raw.cmd("RSET")
        await raw.cmd(f"MAIL FROM:<{SENDER}>")
        await raw.cmd("RCPT TO:<d@example.test>")
        assert (await raw.cmd("DATA")).startswith(b"354")
        raw.writer.write(b"Subject: 4\r\n\r\nbody\r\n.\r\n")
        assert await raw.closed_without_reply()
        raw.close()

    with FakeRelay(Faults(swallow_every=2)) as relay:
        run(scenario(relay))
        assert relay.count_by_rcpt() == {"a@example.test": 2, "b@example.test": 1, "c@example.test": 1, "d@example.test": 1}
        assert relay.message_count == 4 and relay.drop_reasons == {"swallow": 2}


# --------------------------------------------------------------------------- RCPT faults


def test_tempfail_first_per_address_case_insensitive() -> None:
    async def scenario(relay: FakeRelay) -> None:
        smtp = await connected(relay)
        await smtp.mail(SENDER)
        with pytest.raises(aiosmtplib.SMTPRecipientRefused) as info:
            await smtp.rcpt("Greylisted@Example.test")
        assert info.value.code == 451 and info.value.message.startswith("4.3.0")
        await smtp.rcpt("greylisted@example.TEST")  # second try, other case: accepted
        await smtp.data(message(1))
        await smtp.quit()
        smtp = await connected(relay)  # memory is relay-wide, not per session
        errors, _ = await smtp.sendmail(SENDER, ["GREYLISTED@example.test", "new@example.test"], message(2))
        assert list(errors) == ["new@example.test"] and errors["new@example.test"][0] == 451
        await smtp.quit()

    with FakeRelay(Faults(tempfail_first=True)) as relay:
        run(scenario(relay))
        assert relay.count_by_rcpt() == {"greylisted@example.test": 2}


def test_reject_domains() -> None:
    async def scenario(relay: FakeRelay) -> None:
        smtp = await connected(relay)
        await smtp.mail(SENDER)
        with pytest.raises(aiosmtplib.SMTPRecipientRefused) as info:
            await smtp.rcpt("nobody@Bad.Example")
        assert info.value.code == 550
        assert info.value.message == "5.1.1 <nobody@Bad.Example>: Recipient address rejected: User unknown"
        await smtp.rcpt("someone@sub.bad.example")  # exact domain match only
        await smtp.data(message(1))
        await smtp.quit()

    with FakeRelay(Faults(reject_domains=["bad.example"])) as relay:
        run(scenario(relay))
        assert relay.count_by_rcpt() == {"someone@sub.bad.example": 1}


# --------------------------------------------------------------------------- timing faults


def test_reply_delay_and_record_before_reply() -> None:
    async def scenario(relay: FakeRelay) -> None:
        smtp = await connected(relay)
        started = time.monotonic()
        await smtp.sendmail(SENDER, ["slow@example.test"], message(1))
        assert time.monotonic() - started >= 0.3
        # a client that gives up while waiting has nevertheless delivered it
        with pytest.raises(aiosmtplib.SMTPTimeoutError):
            await smtp.sendmail(SENDER, ["slow@example.test"], message(2), timeout=0.05)
        await await_relay(relay, lambda r: r.message_count == 2)

    with FakeRelay(Faults(reply_delay=0.3)) as relay:
        run(scenario(relay))
        assert relay.count_by_rcpt() == {"slow@example.test": 2}


def test_quota_blocks_mail_from_for_a_while() -> None:
    reply = "421 4.7.0 Daily user sending quota exceeded"

    async def mail_reply(relay: FakeRelay) -> bytes:
        raw, _ = await Raw.open(relay)
        assert (await raw.cmd("HELO client.test")).startswith(b"250")
        answer = await raw.cmd(f"MAIL FROM:<{SENDER}>")
        if answer.startswith(b"421"):
            assert await raw.closed_without_reply()  # closed right after the reply
        else:
            await raw.cmd("QUIT")
        raw.close()
        return answer.rstrip()

    async def scenario(relay: FakeRelay) -> float:
        await send_one(relay, ["a@example.test"], 1)
        await send_one(relay, ["a@example.test"], 2)  # trips the quota
        tripped = time.monotonic()
        assert await mail_reply(relay) == reply.encode()
        smtp = await connected(relay)
        with pytest.raises(aiosmtplib.SMTPSenderRefused) as info:
            await smtp.sendmail(SENDER, ["a@example.test"], message(3))
        assert info.value.code == 421
        loop = asyncio.get_running_loop()

        def lifted() -> bool:  # in a thread: each probe runs on this test's loop
            probe = asyncio.run_coroutine_threadsafe(mail_reply(relay), loop)
            return probe.result(DEADLINE) == b"250 2.1.0 Ok"

        await asyncio.to_thread(wait_until, lifted, DEADLINE, "the quota block to lift")
        return time.monotonic() - tripped

    with FakeRelay(Faults(quota_after=2, quota_seconds=0.4)) as relay:
        assert run(scenario(relay)) >= 0.4
        assert relay.message_count == 2 and relay.drop_reasons["quota"] >= 2


# --------------------------------------------------------------------------- live changes, stop


def test_set_faults_live_and_new_epoch(relay: FakeRelay) -> None:
    run(send_one(relay, ["a@example.test"], 1))
    relay.set_faults(Faults(greeting_421=True))
    with pytest.raises(aiosmtplib.SMTPConnectResponseError):
        run(connected(relay))
    relay.set_faults(Faults(swallow_every=2))  # counter restarts: 1st ok, 2nd swallowed
    run(send_one(relay, ["a@example.test"], 2))
    with pytest.raises(aiosmtplib.SMTPServerDisconnected):
        run(send_one(relay, ["a@example.test"], 3))
    relay.set_faults(Faults())
    run(send_one(relay, ["a@example.test"], 4))
    assert relay.count_by_rcpt() == {"a@example.test": 4}
    assert relay.sessions_refused == 1 and relay.drops == 1


def test_stop_does_not_hang_with_clients_connected() -> None:
    relay = FakeRelay(Faults(reply_delay=30))
    relay.start()

    async def scenario() -> None:
        idle, _ = await Raw.open(relay)
        mid_data, _ = await Raw.open(relay)
        await mid_data.envelope()
        assert (await mid_data.cmd("DATA")).startswith(b"354")
        mid_data.writer.write(b"Subject: unfinished\r\n")
        waiting, _ = await Raw.open(relay)
        await waiting.envelope()
        assert (await waiting.cmd("DATA")).startswith(b"354")
        waiting.writer.write(b"Subject: done\r\n\r\n.\r\n")  # relay now sleeps 30 s
        await await_relay(relay, lambda r: r.message_count == 1 and r.active_sessions == 3)
        started = time.monotonic()
        await asyncio.to_thread(relay.stop)
        assert time.monotonic() - started < 2.0
        for raw in (idle, mid_data, waiting):
            assert await raw.closed_without_reply()
            raw.close()

    run(scenario())
    relay.stop()  # idempotent


# --------------------------------------------------------------------------- command line


def test_cli_runs_until_sigterm_and_summarises() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "mailerd.testing.relay", "--port", "0", "--tempfail-first"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        match = re.search(r"listening on 127\.0\.0\.1:(\d+)", proc.stdout.readline())
        assert match, "no listening line"
        relay_view = FakeRelay(port=int(match.group(1)))  # only used for its .port

        async def scenario() -> None:
            smtp = client(relay_view)
            await smtp.connect()
            with pytest.raises(aiosmtplib.SMTPRecipientsRefused):
                await smtp.sendmail(SENDER, ["dup@example.test", "x@example.test"], message(0))
            for n in range(1, 3):
                await smtp.sendmail(SENDER, ["dup@example.test", "x@example.test"], message(n))
            await smtp.quit()

        run(scenario())
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=DEADLINE)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert out.count("msgid=<") == 2  # the first attempt was tempfailed
    assert "messages received: 2 (4 recipient deliveries)" in out
    assert "distinct recipients: 2" in out
    assert "duplicates: 2 extra deliveries to 2 recipients" in out


def test_cli_refuses_non_loopback() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mailerd.testing.relay", "--host", "10.1.2.3", "--quiet"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=DEADLINE,
    )
    assert result.returncode == 2 and "non-loopback" in result.stderr
