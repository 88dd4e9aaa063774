"""Who may use the control socket.

The socket's file mode (0660 with a group, else 0600) is the first gate; the
second is the peer's credentials (SO_PEERCRED), checked on every connection:
root, the daemon's own user, and members of `[daemon] socket_group` (by the
peer's gid, its user's primary group, or the group's member list) are served;
anyone else gets one clear Error reply and the connection is closed.
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
    def __init__(self, group: str | None) -> None:
        self.group = group
        self.gid = resolve_group(group) if group else None
        self.own_uid = os.getuid()

    def refusal(self, peer: Peer) -> str | None:
        """None if `peer` may use the socket, else the message to send it."""
        if peer.uid in (0, self.own_uid):
            return None
        if self.gid is not None and self._member(peer):
            return None
        me = _user_name(self.own_uid)
        if self.group is None:
            return (f"permission denied: uid {peer.uid} is neither root nor mailerd's own user "
                    f"({me}); set [daemon] socket_group to let a group in")
        return (f"permission denied: uid {peer.uid} is not root, mailerd's own user ({me}), "
                f"or a member of group {self.group}")

    def _member(self, peer: Peer) -> bool:
        if peer.gid == self.gid:
            return True
        try:
            user = pwd.getpwuid(peer.uid)
        except KeyError:
            return False
        if user.pw_gid == self.gid:
            return True
        try:
            members = grp.getgrgid(self.gid).gr_mem
        except KeyError:
            return False
        return user.pw_name in members


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"
