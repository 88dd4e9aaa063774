"""Control-socket access: SO_PEERCRED of a real second uid (nobody), group checks.

A forked child drops to uid nobody (setgroups/setgid/setuid, as setpriv
--reuid=nobody --regid=nogroup --clear-groups does) and runs mailerctl's main()
against the daemon, so the daemon sees a real foreign peer on its real socket.
(A fork rather than `setpriv python -m mailerctl`: nobody may not be able to read
the interpreter's installation, e.g. under /root.)
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pwd
import grp
import shutil
import stat
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pytest

import encodings.utf_8_sig  # noqa: F401  (enqueue reads lists with it; the child cannot load it)
import mailerctl.cli  # imported before any fork: the child may not be able to read it
from conftest import make_campaign, relay_server
from mailerd.testing.relay import Faults
from mailerd.control.access import AccessPolicy, Peer

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not sys.platform.startswith("linux"),
    reason="needs root on Linux to run a client as a second uid (nobody)")

NOBODY = 65534


@pytest.fixture
def served(daemon_factory) -> Iterator[Any]:
    """daemon_factory, with the control socket in a directory nobody may traverse
    (pytest's own tmp directories are root-only)."""
    base = Path(tempfile.mkdtemp(prefix="mailerd-access-"))
    base.chmod(0o711)

    def make(servers: dict[str, Any], daemon: dict[str, Any]):
        sock = base / f"control{len(list(base.iterdir()))}.sock"
        made = daemon_factory(servers, daemon={"socket": str(sock), **daemon})
        made.socket = str(sock)
        return made.start()

    yield make
    shutil.rmtree(base, ignore_errors=True)


def nobody_ids() -> tuple[int, int]:
    try:
        user = pwd.getpwnam("nobody")
        return user.pw_uid, user.pw_gid
    except KeyError:
        return NOBODY, NOBODY


def run_as(uid: int, gid: int, argv: list[str]) -> tuple[int, str, str]:
    """mailerctl main(argv) in a child with exactly uid/gid and no other groups."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 99
        out, err = io.StringIO(), io.StringIO()
        try:
            os.close(read_fd)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    mailerctl.cli.main(argv)
                except SystemExit as exc:
                    code = exc.code if isinstance(exc.code, int) else 1
        except BaseException as exc:  # report anything to the parent
            err.write(f"child failed: {exc!r}")
        finally:
            os.write(write_fd, json.dumps([code, out.getvalue(), err.getvalue()]).encode())
            os._exit(0)
    os.close(write_fd)
    chunks = []
    while chunk := os.read(read_fd, 65536):
        chunks.append(chunk)
    os.close(read_fd)
    os.waitpid(pid, 0)
    code, out, err = json.loads(b"".join(chunks))
    return code, out, err


def test_a_uid_outside_the_group_is_refused_with_a_clear_message(served):
    uid, gid = nobody_ids()
    # mode 0666 lets anyone connect, so that the peer-credential check is what refuses
    daemon = served({}, {"socket_group": "root", "socket_mode": 0o666})
    code, out, err = run_as(uid, gid, ["--socket", daemon.socket, "status"])
    assert code == 1, (code, out, err)
    assert (f"permission denied: uid {uid} is not root, mailerd's own user (root), "
            f"or a member of group root") in err
    daemon.log_line("control_refused", f"peer_uid={uid}")
    daemon.status()  # root still is served, the daemon goes on


def test_without_a_group_only_root_and_the_daemons_user_are_served(served):
    uid, gid = nobody_ids()
    daemon = served({}, {"socket_mode": 0o666})
    code, out, err = run_as(uid, gid, ["--socket", daemon.socket, "list"])
    assert code == 1
    assert f"permission denied: uid {uid} is neither root nor mailerd's own user" in err


def test_group_members_are_served_and_their_changes_logged_with_uid_and_pid(
        tmp_path, relay_factory, served):
    uid, gid = nobody_ids()
    group = grp.getgrgid(gid).gr_name
    relay = relay_factory()
    # members of admin_group may change any campaign (here: one that root enqueued)
    daemon = served({"isp": relay_server(relay)}, {"socket_group": group, "admin_group": group})
    mode = os.stat(daemon.socket)
    assert stat.S_IMODE(mode.st_mode) == 0o660 and mode.st_gid == gid
    cid = daemon.send_campaign(tmp_path / "c", 5)
    daemon.wait_done(cid)

    # member through the process's own gid
    code, out, err = run_as(uid, gid, ["--socket", daemon.socket, "resume", str(cid), "--json"])
    assert code == 0, err
    assert json.loads(out)["id"] == cid
    line = daemon.log_line(" campaign_resumed ")
    assert f"peer_uid={uid}" in line and "peer_pid=" in line

    # member through the user's primary group while the process runs with another gid:
    # the socket file must let it in first, so open it up for this part
    os.chmod(daemon.socket, 0o666)
    code, out, err = run_as(uid, 4242, ["--socket", daemon.socket, "status", "--json"])
    assert code == 0, err


def test_the_socket_file_keeps_strangers_out_before_the_daemon_is_asked(served):
    uid, gid = nobody_ids()
    daemon = served({}, {"socket_group": "root"})
    assert stat.S_IMODE(os.stat(daemon.socket).st_mode) == 0o660
    code, out, err = run_as(uid, gid, ["--socket", daemon.socket, "status"])
    assert code == 3 and err.startswith("mailerctl: permission denied: cannot open")


def test_policy_rules():
    uid, gid = nobody_ids()
    policy = AccessPolicy(grp.getgrgid(gid).gr_name)
    assert policy.refusal(Peer(pid=1, uid=0, gid=0)) is None
    assert policy.refusal(Peer(pid=1, uid=os.getuid(), gid=1)) is None
    assert policy.refusal(Peer(pid=1, uid=uid, gid=gid)) is None
    assert policy.refusal(Peer(pid=1, uid=4242, gid=4242)) is not None
    assert "member of group" in AccessPolicy("root").refusal(Peer(pid=1, uid=uid, gid=gid))
    with pytest.raises(ValueError, match="no group named"):
        AccessPolicy("no-such-group-mailerd")


def readable_campaign(count: int) -> tuple[Path, Path]:
    """make_campaign's files in a directory any user may read (pytest's tmp is root-only)."""
    directory = Path(tempfile.mkdtemp(prefix="mailerd-access-campaign-"))
    directory.chmod(0o755)
    files = make_campaign(directory, count)
    for path in directory.iterdir():
        path.chmod(0o644)
    return files


def test_a_member_changes_only_its_own_campaigns_and_no_global_settings(
        tmp_path, relay_factory, served):
    """Review I1: members read and enqueue; another member's (here root's) campaign, suppress
    remove, set and debug-freeze need the admin role."""
    uid, gid = nobody_ids()
    group = grp.getgrgid(gid).gr_name
    relay = relay_factory(Faults(reply_delay=0.05))
    daemon = served({"isp": relay_server(relay)},
                    {"socket_group": group, "debug_commands": True})
    roots = daemon.send_campaign(tmp_path / "c", 200)
    member = ["--socket", daemon.socket]

    for argv in (["pause", str(roots)], ["cancel", str(roots)], ["resume", str(roots)],
                 ["settle", str(roots), "--as", "resend"], ["suppress", "remove", "a@example.com"],
                 ["set", "isp", "rate=1/s"], ["debug-freeze", "1"]):
        code, out, err = run_as(uid, gid, member + argv)
        assert code != 0 and "permission denied" in err, (argv, code, out, err)
        assert "admin role" in err, (argv, err)
    assert daemon.report(roots).state == "running"   # nothing of it changed hands
    code, out, err = run_as(uid, gid, member + ["report", str(roots), "--json"])
    assert code == 0 and json.loads(out)["id"] == roots, err   # reading is a member's right

    campaign, recipients = readable_campaign(5)
    code, out, err = run_as(uid, gid, member + ["enqueue", str(campaign), "-r", str(recipients),
                                                "--json"])
    assert code == 0, err
    own = json.loads(out)["id"]
    code, out, err = run_as(uid, gid, member + ["pause", str(own)])
    assert code == 0 or daemon.report(own).state == "done", err
    daemon.log_line("control_denied", f"peer_uid={uid}")
    daemon.ctl("cancel", str(roots))   # root, the admin, may change any campaign


def test_policy_roles():
    uid, gid = nobody_ids()
    group = grp.getgrgid(gid).gr_name
    members_only = AccessPolicy(group)
    assert members_only.is_admin(Peer(pid=1, uid=0, gid=0))
    assert members_only.is_admin(Peer(pid=1, uid=os.getuid(), gid=1))
    assert not members_only.is_admin(Peer(pid=1, uid=uid, gid=gid))
    assert AccessPolicy(group, admin_group=group).is_admin(Peer(pid=1, uid=uid, gid=gid))
    with pytest.raises(ValueError, match="no group named"):
        AccessPolicy(group, admin_group="no-such-group-mailerd")
