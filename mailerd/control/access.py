"""Who may use the control socket.

The socket's file mode (0660 with a group, else 0600) is the first gate; the
second is the peer's credentials (SO_PEERCRED), checked on every connection:
root, the daemon's own user, and members of `[daemon] socket_group` (by the
peer's gid, its user's primary group, or the group's member list) are served;
anyone else gets one clear Error reply and the connection is closed. Who is
served holds one of two roles (AccessPolicy), decided once per connection.
"""

from __future__ import annotations

import grp
import os
import pwd
import socket
import struct
from typing import NamedTuple

from mailerd.config import resolve_group


class Peer(NamedTuple):
    """The process at the other end of a control connection (SO_PEERCRED)."""

    pid: int
    uid: int
    gid: int

    @property
    def log_fields(self) -> dict[str, int]:
        """The peer as the events about its requests name it: peer_uid, peer_pid."""
        return {"peer_uid": self.uid, "peer_pid": self.pid}

    @property
    def who(self) -> str:
        """The peer as the journal's records and `mailerctl set` name it."""
        return f"uid={self.uid} pid={self.pid}"


def peer_credentials(sock: socket.socket) -> Peer:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return Peer(*struct.unpack("3i", creds))


class AccessPolicy:
    """Two roles. Members (of `socket_group`) may read everything, enqueue, add to the
    suppression list, test-send, and change their own campaigns. Admins (root, the
    daemon's own user, members of `admin_group`) may also change anyone's campaign,
    remove suppressions, change pacing and use the debug commands."""

    def __init__(self, group: str | None, admin_group: str | None = None) -> None:
        self.group = group
        self.admin_group = admin_group
        self.gid = resolve_group(group) if group else None
        self.admin_gid = resolve_group(admin_group) if admin_group else None
        self.own_uid = os.getuid()

    def is_admin(self, peer: Peer) -> bool:
        if peer.uid in (0, self.own_uid):
            return True
        return self.admin_gid is not None and _member(peer, self.admin_gid)

    def refusal(self, peer: Peer) -> str | None:
        """None if `peer` may use the socket, else the message to send it."""
        if self.is_admin(peer):
            return None
        if self.gid is not None and _member(peer, self.gid):
            return None
        me = _user_name(self.own_uid)
        if self.group is None:
            return (f"permission denied: uid {peer.uid} is neither root nor mailerd's own user "
                    f"({me}); set [daemon] socket_group to let a group in")
        return (f"permission denied: uid {peer.uid} is not root, mailerd's own user ({me}), "
                f"or a member of group {self.group}")

    def admins(self) -> str:
        """Who holds the admin role, as a refusal names them."""
        who = f"root or mailerd's own user ({_user_name(self.own_uid)})"
        return f"{who} or a member of group {self.admin_group}" if self.admin_group else who


def _member(peer: Peer, gid: int) -> bool:
    """Is the peer in group `gid`: by its gid, its user's primary group, or the member list."""
    if peer.gid == gid:
        return True
    try:
        user = pwd.getpwuid(peer.uid)
    except KeyError:
        return False
    if user.pw_gid == gid:
        return True
    try:
        members = grp.getgrgid(gid).gr_mem
    except KeyError:
        return False
    return user.pw_name in members


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"
