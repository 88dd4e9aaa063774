"""sd_notify through a NOTIFY_SOCKET the test binds, and journald output with fields.

Real daemons, real sockets: the notify messages are the datagrams systemd would get,
and the journald entries are what libsystemd (systemd-python) really sends, caught on
a socket that stands in for /run/systemd/journal/socket in a private mount namespace.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from conftest import campaign_addresses, relay_server, wait_until
from mailerd.system import journald, log, notify
from mailerd.schema.control import DebugFreeze, Status

STATUS_LINE = re.compile(r"^\d+ campaigns? running, [\d,]+ sent, \d+ servers? parked$")


class DatagramSink:
    """A bound SOCK_DGRAM socket and a thread collecting what arrives on it."""

    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        self.sock.bind(address)
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, bytes]] = []
        self.cond = threading.Condition()
        self.on_message = None
        self._stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                data, ancillary, _, _ = self.sock.recvmsg(1 << 20, socket.CMSG_SPACE(64))
            except socket.timeout:
                continue
            except OSError:
                return
            for level, kind, payload in ancillary:  # big entries come as a memfd
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fd = struct.unpack("i", payload[:4])[0]
                    with os.fdopen(fd, "rb") as memfd:
                        memfd.seek(0)
                        data = memfd.read()
            if self.on_message is not None:
                self.on_message(data)
            with self.cond:
                self.messages.append((time.monotonic(), data))
                self.cond.notify_all()

    def wait_for(self, predicate, timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                value = predicate(list(self.messages))
                if value:
                    return value
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out after {timeout}s waiting for {what}; "
                                         f"got {[m for _, m in self.messages][-20:]}")
                self.cond.wait(left)

    def close(self) -> None:
        self._stop = True
        self.thread.join(2)
        self.sock.close()


def notify_fields(data: bytes) -> dict[str, str]:
    return dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)


# ------------------------------------------------------------------ sd_notify


def test_ready_only_once_the_socket_answers_then_status_watchdog_and_stopping(
        tmp_path, daemon_factory):
    sink = DatagramSink(str(tmp_path / "notify.sock"))
    daemon = daemon_factory({}, daemon={"debug_commands": True},
                            env={"NOTIFY_SOCKET": str(tmp_path / "notify.sock"),
                                 "WATCHDOG_USEC": "400000"})
    answered_at_ready: list[bool] = []

    def on_message(data: bytes) -> None:
        if notify_fields(data).get("READY") == "1":  # ask the daemon right now, no retry
            try:
                answered_at_ready.append(daemon.call(Status()).pid == daemon.proc.pid)
            except Exception:
                answered_at_ready.append(False)

    sink.on_message = on_message
    try:
        daemon.start(wait=False)
        ready = sink.wait_for(
            lambda msgs: [notify_fields(m) for _, m in msgs if b"READY=1" in m], 20, "READY=1")
        assert answered_at_ready == [True], "READY=1 came before the control socket answered"
        assert STATUS_LINE.match(ready[0]["STATUS"]), ready[0]
        assert ready[0]["STATUS"] == "0 campaigns running, 0 sent, 0 servers parked"

        # WATCHDOG=1 every WATCHDOG_USEC/2 = 0.2 s, from the event loop
        pings = sink.wait_for(
            lambda msgs: (p := [t for t, m in msgs if m == b"WATCHDOG=1"]) and len(p) >= 5 and p,
            10, "five watchdog pings")
        gaps = [b - a for a, b in zip(pings, pings[1:])]
        assert max(gaps) < 1.0, gaps

        # a frozen loop stops the pings: that is what makes systemd's watchdog fire
        daemon.call(DebugFreeze(seconds=1.5))
        frozen_at = time.monotonic()
        sink.wait_for(lambda msgs: [t for t, m in msgs if m == b"WATCHDOG=1" and t > frozen_at + 1.4],
                      10, "pings after the freeze")
        around = [t for t, m in sink.messages if m == b"WATCHDOG=1" and t > frozen_at - 0.5]
        longest = max(b - a for a, b in zip(around, around[1:]))
        assert longest >= 1.3, "pings went on while the loop was frozen"

        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.proc.wait(20) == 0
        stopping = sink.wait_for(
            lambda msgs: [notify_fields(m) for _, m in msgs if b"STOPPING=1" in m], 5, "STOPPING=1")
        assert "draining" in stopping[0]["STATUS"]
    finally:
        daemon.cleanup()
        sink.close()


def test_status_counts_campaigns_and_sent_messages(tmp_path, relay_factory, daemon_factory):
    relay = relay_factory()
    sink = DatagramSink(str(tmp_path / "notify.sock"))
    daemon = daemon_factory({"isp": relay_server(relay, connections=2)},
                            env={"NOTIFY_SOCKET": str(tmp_path / "notify.sock")})
    try:
        daemon.start()
        cid = daemon.send_campaign(tmp_path / "c", 1234)
        daemon.wait_done(cid)
        lines = sink.wait_for(
            lambda msgs: [s for _, m in msgs if (s := notify_fields(m).get("STATUS", ""))
                          .startswith("0 campaigns running, 1,234 sent")],
            15, "STATUS= with 1,234 sent")
        assert STATUS_LINE.match(lines[-1])
        seen = [notify_fields(m).get("STATUS") for _, m in sink.messages]
        assert any(s and s.startswith("1 campaign running, ") for s in seen), seen
        assert not [m for _, m in sink.messages if b"WATCHDOG" in m], "no WATCHDOG_USEC, no pings"
    finally:
        daemon.cleanup()
        sink.close()


def test_notify_without_the_library_sends_the_datagram_itself(tmp_path, monkeypatch):
    """sd_notify is only a datagram: the fallback reaches path and abstract sockets."""
    name = f"mailerd-test-{os.getpid()}-{time.monotonic_ns()}"
    abstract = DatagramSink(b"\0" + name.encode())
    path = DatagramSink(str(tmp_path / "n.sock"))
    monkeypatch.setattr(notify, "_sd_daemon", None)
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify.ready("1 campaign running, 3 sent, 0 servers parked")
        abstract.wait_for(lambda msgs: msgs, 5, "the abstract-socket datagram")
        assert notify_fields(abstract.messages[0][1]) == {
            "READY": "1", "STATUS": "1 campaign running, 3 sent, 0 servers parked"}

        monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "n.sock"))
        monkeypatch.setenv("WATCHDOG_USEC", "3000000")
        assert notify.watchdog_interval() == 1.5
        assert notify.watchdog()
        path.wait_for(lambda msgs: msgs, 5, "the path-socket datagram")
        assert path.messages[0][1] == b"WATCHDOG=1"

        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
        assert notify.watchdog_interval() is None  # that watchdog is someone else's
        monkeypatch.delenv("NOTIFY_SOCKET")
        assert not notify.status("nobody listens")  # outside systemd: a no-op
    finally:
        abstract.close()
        path.close()


# ------------------------------------------------------------------ journald


def test_journald_handler_maps_fields_and_drops_secrets():
    sent: list[tuple[str, dict[str, Any]]] = []
    handler = journald.JournaldHandler(send=lambda message, **fields: sent.append((message, fields)),
                                       message=log.readable)
    logger = logging.getLogger("mailerd.test-journald")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    fields = {"campaign": 3, "recipient": "a@example.org", "server": "isp", "smtp_code": 550,
              "smtp_reply": "5.1.1 <a@example.org>: User unknown", "attempts": 2,
              "peer-uid": 7, "password": "hunter2", "dkim_key": "-----BEGIN",
              "relay_secret": "s3", "credentials": "c", "none_field": None}
    logger.log(logging.INFO, "failed", extra={"fields": fields, "event": "failed"})
    logger.log(logging.WARNING, "pacing", extra={"fields": {"server": "isp"}, "event": "pacing"})
    logger.log(logging.ERROR, "boom", extra={"fields": {}, "event": "boom"})
    logger.log(logging.DEBUG, "chatter", extra={"fields": {}, "event": "chatter"})

    message, entry = sent[0]
    assert entry["MAILERD_EVENT"] == "failed"
    assert entry["PRIORITY"] == "6"
    assert entry["SYSLOG_IDENTIFIER"] == "mailerd"
    assert entry["MAILERD_CAMPAIGN"] == "3"
    assert entry["MAILERD_RECIPIENT"] == "a@example.org"
    assert entry["MAILERD_SERVER"] == "isp"
    assert entry["SMTP_CODE"] == "550"
    assert entry["SMTP_REPLY"] == "5.1.1 <a@example.org>: User unknown"
    assert entry["MAILERD_ATTEMPTS"] == "2"
    assert entry["MAILERD_PEER_UID"] == "7"
    assert entry["CODE_FILE"].endswith("test_notify_and_logging.py")
    assert "MAILERD_NONE_FIELD" not in entry
    text = repr(sent)
    for secret in ("hunter2", "BEGIN", "s3", "PASSWORD", "DKIM", "SECRET", "CREDENTIALS"):
        assert secret not in text
    assert message.startswith("failed campaign=3 recipient=a@example.org server=isp smtp_code=550")
    assert [e["PRIORITY"] for _, e in sent[1:]] == ["4", "3", "7"]


def test_event_drops_secret_fields_for_every_sink(capsys):
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    log.logger.handlers[:] = [Keep()]
    log.logger.setLevel(logging.INFO)
    try:
        log.event("server_added", server="isp", password="hunter2", api_token="t", user="me")
    finally:
        log.logger.handlers[:] = []
    assert records[0].fields == {"server": "isp", "user": "me"}
    assert "hunter2" not in log.KeyValueFormatter().format(records[0])


def test_a_blocked_journal_never_stalls_the_caller():
    """journald may block its writers: event() must still return at once."""
    release = threading.Event()
    got: list[dict[str, Any]] = []

    def blocking_send(message: str, **fields: Any) -> None:
        release.wait(30)
        got.append(fields)

    handler = journald.JournaldHandler(send=blocking_send, message=log.readable)
    log.setup_logging("info", handler=handler, queue_size=1000)
    try:
        started = time.monotonic()
        for i in range(5000):
            log.event("sent", campaign=1, recipient=f"u{i}@example.org")
        assert time.monotonic() - started < 2.0, "event() waited for the blocked journal"
        release.set()

        flushes = 0

        def flush_queued_without_loss() -> bool:
            """A pending drop note goes in ahead of the next record that fits."""
            nonlocal flushes
            flushes += 1
            log.event("sent", campaign=1, flush=flushes)
            return log.logger.handlers[0].dropped == 0

        wait_until(flush_queued_without_loss, 20, "a record queued with no drop left uncounted")
        wait_until(lambda: any(f.get("MAILERD_FLUSH") == str(flushes) for f in got), 20,
                   "the last record delivered")
        noted = sum(int(f["MAILERD_COUNT"]) for f in got if f["MAILERD_EVENT"] == "log_records_dropped")
        delivered = sum(1 for f in got if f["MAILERD_EVENT"] == "sent")
        assert delivered + noted == 5000 + flushes, "a record was lost without being counted"
        assert noted >= 5000 - 1001
    finally:
        release.set()
        log.stop_logging()
        log.logger.handlers[:] = []


def test_journal_stream_detection(tmp_path, monkeypatch):
    with open(tmp_path / "f", "w") as stream:
        st = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        assert journald.stderr_is_journal(stream)
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino + 1}")
        assert not journald.stderr_is_journal(stream)
        monkeypatch.setenv("JOURNAL_STREAM", "garbage")
        assert not journald.stderr_is_journal(stream)
        monkeypatch.delenv("JOURNAL_STREAM")
        assert not journald.stderr_is_journal(stream)
        assert isinstance(log.log_handler(stream), logging.StreamHandler)


def parse_native(data: bytes) -> dict[str, str]:
    """journald's native protocol: KEY=value lines, or KEY\\n<le64 size><value>\\n."""
    fields: dict[str, str] = {}
    i = 0
    while i < len(data):
        end = data.index(b"\n", i)
        line = data[i:end]
        if b"=" in line:
            key, _, value = line.partition(b"=")
            fields[key.decode()] = value.decode()
            i = end + 1
        else:
            (size,) = struct.unpack("<Q", data[end + 1:end + 9])
            fields[line.decode()] = data[end + 9:end + 9 + size].decode()
            i = end + 9 + size + 1
    return fields


needs_journal_stand_in = pytest.mark.skipif(
    os.geteuid() != 0 or not sys.platform.startswith("linux") or not journald.available(),
    reason="needs root on Linux (a private mount namespace stands a test socket in for "
           "/run/systemd/journal/socket) and systemd-python")


class JournalStandIn(NamedTuple):
    sink: DatagramSink  # what libsystemd sends, one datagram per entry (parse_native)
    stderr: socket.socket  # our end of the daemon's stderr
    daemon_options: dict[str, Any]  # for daemon_factory


def journal_stand_in(tmp_path: Path) -> JournalStandIn:
    """A daemon made with `daemon_options` takes its stderr for the journal (its
    $JOURNAL_STREAM names it) and finds the sink at /run/systemd/journal/socket, in
    its own mount namespace only. The caller closes sink and stderr."""
    journal_sock = tmp_path / "journal.sock"
    sink = DatagramSink(str(journal_sock))
    stream_ours, stream_daemons = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    st = os.fstat(stream_daemons.fileno())
    options = {
        "env": {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"},
        "stderr": stream_daemons,
        "prefix": ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                   f"mount -t tmpfs tmpfs /run && mkdir -p /run/systemd/journal && "
                   f"ln -s {journal_sock} /run/systemd/journal/socket && exec \"$@\"", "sh"],
    }
    return JournalStandIn(sink, stream_ours, options)


@needs_journal_stand_in
def test_daemon_logs_to_journald_with_structured_fields(tmp_path, relay_factory, daemon_factory):
    """A real daemon whose stderr is 'the journal' sends native entries via libsystemd."""
    sink, stream_ours, options = journal_stand_in(tmp_path)
    relay = relay_factory()
    (tmp_path / "secret").write_text("hunter2-very-secret\n")
    daemon = daemon_factory(
        {"relay": relay_server(relay, connections=2),
         # only there to make the daemon read a password; nothing is sent through it
         "other": {"host": "127.0.0.1", "port": 9, "username": "me", "connections": 1,
                   "security": "starttls",
                   "password_file": str(tmp_path / "secret")}},
        **options)
    try:
        daemon.start()
        options["stderr"].close()
        cid = daemon.send_campaign(tmp_path / "c", 40, servers=["relay"])
        daemon.wait_done(cid)
        daemon.terminate()
        entries = sink.wait_for(
            lambda msgs: (e := [parse_native(m) for _, m in msgs])
            and any(x.get("MAILERD_EVENT") == "daemon_stopped" for x in e) and e,
            20, "the daemon_stopped entry")
    finally:
        daemon.cleanup()
        sink.close()
    events = [e["MAILERD_EVENT"] for e in entries]
    assert "journal_recovered" in events and "daemon_ready" in events
    sent = [e for e in entries if e["MAILERD_EVENT"] == "sent"]
    assert len(sent) == 40, "one entry per recipient outcome"
    assert {e["MAILERD_RECIPIENT"] for e in sent} == campaign_addresses(40)
    first = sent[0]
    assert first["MAILERD_CAMPAIGN"] == str(cid)
    assert first["MAILERD_SERVER"] == "relay"
    assert first["SMTP_CODE"] == "250"
    assert first["SMTP_REPLY"].startswith("2.0.0 Ok") or "queued" in first["SMTP_REPLY"]
    assert first["PRIORITY"] == "6"
    assert first["SYSLOG_IDENTIFIER"] == "mailerd"
    assert first["MESSAGE"].startswith(f"sent campaign={cid} recipient=")
    assert "7" not in {e["PRIORITY"] for e in entries}, "no debug chatter at log_level info"
    enqueued = next(e for e in entries if e["MAILERD_EVENT"] == "campaign_enqueued")
    assert enqueued["MAILERD_PEER_UID"] == "0" and enqueued["MAILERD_PEER_PID"].isdigit()
    everything = b"".join(m for _, m in sink.messages)
    assert b"hunter2" not in everything, "a password reached the journal"
    stream_ours.settimeout(1)
    try:
        text = stream_ours.recv(65536)
    except socket.timeout:
        text = b""
    assert b" info sent " not in text, "events went to stderr as well as to the journal"
    stream_ours.close()


# ------------------------------------------------------------------ socket activation


def test_socket_activation_serves_the_inherited_socket_and_leaves_it_in_place(
        tmp_path, daemon_factory):
    """As mailerd.socket does: a listening socket as fd 3 with LISTEN_PID/LISTEN_FDS."""
    path = tmp_path / "activated.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(16)
    fd = listener.fileno()
    daemon = daemon_factory(
        {}, pass_fds=(fd,),
        # fd 3 and LISTEN_PID of the process that becomes mailerd (it execs its arguments)
        prefix=[sys.executable, "-c",
                f"import os, sys; os.dup2({fd}, 3); os.close({fd}); "
                "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1'); "
                "os.execv(sys.argv[1], sys.argv[1:])"])
    daemon.socket = str(path)  # where clients go; the config names another path
    try:
        daemon.start()  # waits until the daemon answers on the inherited socket
        daemon.log_line("socket_activated=True")
        assert not (daemon.workdir / "control.sock").exists(), "it made a socket of its own"
        assert daemon.terminate() == 0
        assert path.is_socket(), "the socket belongs to the service manager: it stays"
    finally:
        daemon.cleanup()
        listener.close()
