"""The control socket and mailerctl: bad input gets clear errors, the daemon goes on."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys

import msgspec
import pytest

from conftest import make_campaign, relay_server, wait_until, write_config
from mailerd import wire
from mailerd.schema.control import Error, Status


def raw_exchange(path: str, payload: bytes) -> bytes:
    """Send raw bytes, return whatever the daemon answers before closing."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(path)
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def decode_reply(data: bytes):
    assert len(data) >= 4, "the daemon answered nothing"
    (length,) = struct.unpack(">I", data[:4])
    from mailerd.schema.control import AnyReply
    return msgspec.msgpack.decode(data[4 : 4 + length], type=AnyReply)


@pytest.fixture
def daemon(relay_factory, daemon_factory):
    relay = relay_factory()
    return daemon_factory({"isp": relay_server(relay)}).start()


@pytest.mark.parametrize("payload, expected", [
    (b"\x00\x00\x00\x05hello", "undecodable"),
    (struct.pack(">I", 1 << 30) + b"x", "exceeds the limit"),
    (b"\x00\x00\x00\x10abc", "truncated"),
    (wire.pack({"op": "Explode"}), "undecodable"),
    (wire.pack({"op": "Status", "v": 99}), "protocol version 99"),
])
def test_malformed_frames_get_an_error_and_the_daemon_keeps_serving(daemon, payload, expected):
    reply = decode_reply(raw_exchange(daemon.socket, payload))
    assert isinstance(reply, Error)
    assert expected in reply.message
    assert daemon.status().pid == daemon.proc.pid  # still serving everyone else


def test_a_stalled_client_does_not_block_others(daemon):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stalled:
        stalled.connect(daemon.socket)
        stalled.sendall(b"\x00\x00\x01\x00partial")
        for _ in range(20):
            assert daemon.status().pid == daemon.proc.pid


def test_enqueue_errors_name_the_problem(tmp_path, daemon):
    campaign, recipients = make_campaign(tmp_path / "c", 5)
    missing = daemon.ctl("enqueue", str(tmp_path / "nope.toml"), "--recipients", str(recipients),
                         check=False)
    assert missing.returncode == 2
    assert "nope.toml" in missing.stderr and "cannot read" in missing.stderr

    campaign.write_text(campaign.read_text().replace("{{ first_name }}", "{{ surname }}"))
    bad_template = daemon.ctl("enqueue", str(campaign), "--recipients", str(recipients), check=False)
    assert bad_template.returncode == 1
    assert "subject" in bad_template.stderr and "surname" in bad_template.stderr

    campaign.write_text(campaign.read_text() + 'colour = "red"\n')
    unknown = daemon.ctl("enqueue", str(campaign), "--recipients", str(recipients), check=False)
    assert unknown.returncode == 2 and "colour" in unknown.stderr

    no_email = tmp_path / "noemail.csv"
    no_email.write_text("name,address\nA,a@example.com\n")
    bad_list = daemon.ctl("enqueue", str(campaign), "--recipients", str(no_email), check=False)
    assert bad_list.returncode == 2 and "email" in bad_list.stderr and "line 1" in bad_list.stderr

    listed = json.loads(daemon.ctl("list", "--json").stdout)
    assert listed == []  # nothing half-enqueued was kept


def test_unreachable_daemon_exit_code_3(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mailerctl", "--socket", str(tmp_path / "none.sock"), "status"],
        capture_output=True, text=True)
    assert result.returncode == 3
    assert f"cannot connect to {tmp_path / 'none.sock'}: is mailerd running?" in result.stderr


def test_unknown_campaign_is_refused_with_exit_1(daemon):
    result = daemon.ctl("pause", "42", check=False)
    assert result.returncode == 1 and "no campaign with id 42" in result.stderr


def test_report_json_shape_and_list_and_status(tmp_path, daemon):
    cid = daemon.send_campaign(tmp_path / "c", 12, extra_rows=["bogus,X,Y"])
    daemon.wait_done(cid)
    report = json.loads(daemon.ctl("report", str(cid), "--json").stdout)
    assert {"id", "name", "state", "counts"} <= set(report)
    assert report["state"] == "done"
    assert set(report["counts"]) >= {"queued", "sending", "sent", "deferred", "failed",
                                     "uncertain", "invalid"}
    assert report["counts"]["sent"] == 12 and report["counts"]["invalid"] == 1
    invalid = json.loads(daemon.ctl("report", str(cid), "--json", "--state", "invalid").stdout)
    assert [r["email"] for r in invalid["recipients"]] == ["bogus"]
    assert {"email", "state", "attempts", "code", "reply", "updated"} <= set(invalid["recipients"][0])

    table = daemon.ctl("report", str(cid)).stdout
    assert "SENT" in table and "12" in table
    assert str(cid) in daemon.ctl("list").stdout
    status = json.loads(daemon.ctl("status", "--json").stdout)
    assert status["servers"][0]["name"] == "isp"
    assert len(status["servers"][0]["workers"]) == 2
    watch = daemon.ctl("watch", str(cid)).stdout
    assert "sent 12" in watch and "done" in watch


def test_interrupted_enqueue_leaves_nothing_behind(tmp_path, daemon):
    from mailerd.schema.control import CampaignSpec, EnqueueBegin, EnqueueRows, Row
    from mailerctl.client import Client

    spec = CampaignSpec(name="half", sender="a@example.org", subject="s", text="t",
                        columns=["email"])
    with Client(daemon.socket) as client:
        started = client.call(EnqueueBegin(spec=spec))
        client.call(EnqueueRows(campaign=started.campaign, rows=[Row(2, ["a@example.com"])]))
    wait_until(lambda: json.loads(daemon.ctl("list", "--json").stdout) == [], 10,
               "the half-loaded campaign to be discarded")


def test_bad_config_names_the_key_and_file(tmp_path):
    config = write_config(tmp_path / "bad.toml", {"servers.isp": {"host": "x", "prot": 25}})
    result = subprocess.run([sys.executable, "-m", "mailerd", "--config", str(config)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "bad.toml" in result.stderr and "servers.isp.prot" in result.stderr


def test_second_daemon_on_the_same_state_dir_refuses(daemon):
    result = daemon.start_expecting_failure()
    assert result.returncode == 4
    assert f"pid {daemon.proc.pid}" in result.stderr
    assert daemon.call(Status()).pid == daemon.proc.pid


SLOW_RENDER = "{% for i in range(30000) %}{% for j in range(30000) %}{% endfor %}{% endfor %}done"
SLOW_COMPILE = "{{ email }}x" * 100_000  # 1.1 MB: compiling it takes far longer than the bound


def _slow_request(kind: str):
    from mailerd.schema.control import CampaignSpec, EnqueueBegin, TestSend

    if kind == "test-send":
        spec = CampaignSpec(name="slow", sender="a@example.org", subject="s", text=SLOW_RENDER,
                            columns=["email"])
        return TestSend(spec=spec, to="me@example.com")
    spec = CampaignSpec(name="slow", sender="a@example.org", subject="s", text=SLOW_COMPILE,
                        columns=["email"])
    return EnqueueBegin(spec=spec)


@pytest.mark.parametrize("kind, refusal", [
    ("test-send", "rendering the message took more than"),
    ("enqueue", "checking its templates took more than"),
])
def test_a_slow_template_does_not_stall_other_clients(daemon, kind, refusal):
    """Review M3: template work runs off the event loop, and is stopped at a bound."""
    import select
    import time

    from mailerctl.client import Client, Refused

    latencies: list[float] = []

    def status_answered_while_slow_one_pending() -> bool:
        started = time.monotonic()
        with Client(daemon.socket, timeout=5) as other:
            assert other.call(Status()).pid == daemon.proc.pid
        latencies.append(time.monotonic() - started)
        return bool(select.select([slow.sock], [], [], 0)[0])  # its reply has come

    with Client(daemon.socket, timeout=60) as slow:
        slow.send(_slow_request(kind))
        wait_until(status_answered_while_slow_one_pending, 60, "the slow request's reply",
                   interval=0.2)
        with pytest.raises(Refused, match=refusal):
            slow.receive()
    assert len(latencies) >= 5, latencies  # status answered many times before the slow reply
    assert max(latencies) < 3.0, latencies
    assert daemon.ctl("list", "--json").stdout.strip() == "[]"  # nothing half-enqueued kept


def test_report_of_a_state_larger_than_a_frame_is_paged(tmp_path, daemon):
    """Review L6: 6,000 invalid rows of 1.5 KB are more than one 8 MiB frame can carry."""
    bad = [f"bad-{i}-{'x' * 1500}" for i in range(6000)]
    cid = daemon.enqueue(*make_campaign(tmp_path / "c", 0, extra_rows=[f"{b},N,C" for b in bad]))
    listed = json.loads(daemon.ctl("report", str(cid), "--state", "invalid", "--json").stdout)
    assert [r["email"] for r in listed["recipients"]] == bad  # all of them, in line order
    text = daemon.ctl("report", str(cid), "--state", "invalid").stdout
    assert bad[0] in text and bad[-1] in text
    first = json.loads(daemon.ctl("report", str(cid), "--state", "invalid", "--limit", "10",
                                  "--json").stdout)
    assert [r["email"] for r in first["recipients"]] == bad[:10]


def _held_connections(path: str, count: int) -> list[socket.socket]:
    held = []
    for _ in range(count):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)  # blocking: waits while the listen backlog is full
        sock.settimeout(10)
        held.append(sock)
    return held


def _close_all(sockets: list[socket.socket]) -> None:
    for sock in sockets:
        sock.close()


def test_connections_beyond_the_cap_get_a_clear_refusal_logged_once(daemon):
    """Review M4: connections are capped; the daemon serves again once some close."""
    from mailerd.control.limits import MAX_CLIENTS

    held = _held_connections(daemon.socket, MAX_CLIENTS)
    try:
        for _ in range(5):
            reply = decode_reply(raw_exchange(daemon.socket, wire.pack(Status())))
            assert isinstance(reply, Error)
            assert "too many control connections" in reply.message
    finally:
        _close_all(held)
    assert wait_until(lambda: daemon._answers(), 10, "status to be answered again")
    assert daemon.log().count("control_connections_capped") == 1


def test_connection_cap_per_uid_spares_root_and_the_daemons_user():
    from mailerd.control.access import Peer
    from mailerd.control.limits import ConnectionLimits

    limits = ConnectionLimits(trusted_uids={0, 999}, total=10, per_uid=2)
    member, other, root = Peer(pid=1, uid=1001, gid=1), Peer(pid=2, uid=1002, gid=1), Peer(3, 0, 0)
    assert [limits.admit(member) for _ in range(2)] == [None, None]
    assert "from uid 1001 (2 open)" in limits.admit(member)
    assert limits.admit(other) is None  # another uid has its own share
    limits.release(member)
    assert limits.admit(member) is None  # a closed connection makes room
    assert [limits.admit(root) for _ in range(7)] == [None] * 7  # only the total caps root
    assert "too many control connections (10 open)" in limits.admit(root)


def test_running_out_of_descriptors_is_logged_once_not_per_accept(daemon):
    """Review M4: asyncio logs six lines per failed accept(); the daemon logs one event."""
    import resource

    pid = daemon.proc.pid
    in_use = len(os.listdir(f"/proc/{pid}/fd"))
    _, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (in_use + 8, hard))
    held = _held_connections(daemon.socket, 40)  # > the 8 descriptors left, < the backlog
    try:
        daemon.log_line("control_accept_failed", "Too many open files")
    finally:
        _close_all(held)
    # answered again, and after a quiet while the daemon says the trouble is over
    wait_until(lambda: daemon._answers() and "control_accept_recovered" in daemon.log(), 20,
               "status to be answered again, and the recovery to be logged")
    recovered = daemon.log_line("control_accept_recovered")
    failures = int(recovered.rpartition("failures=")[2])
    assert failures >= 2  # several accept() calls failed ...
    log = daemon.log()
    assert log.count("control_accept_failed") == 1  # ... and were logged once
    assert "out of system resource" not in log and "Traceback" not in log


def test_large_frames_share_a_byte_budget_and_small_requests_still_pass(daemon):
    """Review L2: stalled, almost complete 8 MiB frames cannot make the daemon hold more
    than its budget; every other request is still served."""
    from mailerd.control.limits import BUFFER_BUDGET

    size = wire.MAX_FRAME - 1
    announce = struct.pack(">I", size) + b"\x00" * 1000  # then nothing more: stalled
    stalled = _held_connections(daemon.socket, BUFFER_BUDGET // size)
    try:
        for sock in stalled:
            sock.sendall(announce)

        def one_more_is_refused() -> bool:
            reply = decode_reply(raw_exchange(daemon.socket, announce))
            return isinstance(reply, Error) and "budget" in reply.message

        wait_until(one_more_is_refused, 10, "a large frame beyond the budget to be refused")
        assert daemon.status().pid == daemon.proc.pid
    finally:
        _close_all(stalled)

    def budget_given_back() -> bool:
        reply = decode_reply(raw_exchange(daemon.socket, announce))
        return isinstance(reply, Error) and "truncated frame" in reply.message

    wait_until(budget_given_back, 10, "the stalled frames' budget to be given back")
    assert daemon.log().count("control_buffer_full") == 1
