"""A private Dovecot IMAP server for tests: Debian's dovecot-core and dovecot-imapd on loopback,
and with `pop3=True` POP3 too (dovecot-pop3d), on ports of its own.

Own config (`dovecot -c FILE`), base and state directories, log file, a passwd-file
user and a maildir, all in one scratch directory; IMAPS with a certificate for
`localhost` from a CA made for the test (tests/postfix.py's make_test_ca). Nothing
of the host's mail system is used. Messages are put into the mailbox the way a
local delivery agent does: a file in the maildir's new/.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from pathlib import Path

from mailerd.testing.ports import free_port
from mailerd.testing.waiting import wait_until
from postfix import DOVECOT, make_test_ca

IMAP_BINARY = "/usr/lib/dovecot/imap"
POP3_BINARY = "/usr/lib/dovecot/pop3"
NAME = "localhost"

CONF = """\
base_dir = {base}/run
state_dir = {base}/state
log_path = {base}/dovecot.log
protocols = {protocols}
listen = 127.0.0.1
ssl = required
ssl_cert = <{cert}
ssl_key = <{key}
disable_plaintext_auth = yes
auth_mechanisms = plain login
mail_location = maildir:{base}/mail/%u
mail_uid = {uid}
mail_gid = {gid}
first_valid_uid = 1
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {base}/passwd
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={base}/home/%u
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {tls_port}
  }}
}}
service anvil {{
  chroot =
}}
service imap-login {{
  chroot =
}}
"""

POP3_CONF = """\
service pop3-login {{
  chroot =
  inet_listener pop3 {{
    address = 127.0.0.1
    port = {pop3_port}
  }}
  inet_listener pop3s {{
    address = 127.0.0.1
    port = {pop3s_port}
  }}
}}
"""


def missing(pop3: bool = False) -> str | None:
    for binary in (DOVECOT, IMAP_BINARY, *([POP3_BINARY] if pop3 else [])):
        if not os.access(binary, os.X_OK):
            return (f"{binary} is not installed (scripts/setup.sh installs dovecot-core, "
                    "dovecot-imapd, dovecot-pop3d)")
    if os.geteuid() != 0:
        return "a private Dovecot instance needs root"
    try:
        pwd.getpwnam("dovecot")
        pwd.getpwnam("dovenull")
    except KeyError as exc:
        return f"user {exc} is missing (created by Debian's dovecot-core package)"
    return None


class PrivateDovecot:
    """IMAP on 127.0.0.1:`port` (STARTTLS) and `tls_port` (IMAPS), with `pop3` POP3 on
    `pop3_port` (STLS) and `pop3s_port`; one user with a maildir. `extra` is appended
    to the config (e.g. an imap_capability without IDLE)."""

    def __init__(self, user: str = "bounces", password: str = "secret-pw", *,
                 pop3: bool = False, extra: str = "") -> None:
        self.base = Path(tempfile.mkdtemp(prefix="mailerd-dovecot-", dir="/var/tmp"))
        self.base.chmod(0o755)
        self.user, self.password = user, password
        self.port, self.tls_port = free_port(), free_port()
        self.pop3 = pop3
        self.pop3_port, self.pop3s_port = (free_port(), free_port()) if pop3 else (0, 0)
        self.extra = extra
        self.ca_file: Path | None = None
        self.owner = pwd.getpwnam("dovecot")  # the mail files' owner
        self._process: subprocess.Popen[bytes] | None = None
        self._serial = 0

    @property
    def maildir(self) -> Path:
        return self.base / "mail" / self.user

    def start(self) -> "PrivateDovecot":
        for sub in ("run", "state", f"home/{self.user}", f"mail/{self.user}"):
            (self.base / sub).mkdir(parents=True)
        for sub in ("mail", f"mail/{self.user}", "home", f"home/{self.user}"):
            shutil.chown(self.base / sub, self.owner.pw_uid, self.owner.pw_gid)
        self.ca_file, cert, key = make_test_ca(self.base / "tls", NAME)
        passwd = self.base / "passwd"
        passwd.write_text(f"{self.user}:{{PLAIN}}{self.password}\n")
        passwd.chmod(0o640)
        shutil.chown(passwd, "root", "dovecot")
        config = self.base / "dovecot.conf"
        text = CONF.format(base=self.base, cert=cert, key=key, port=self.port,
                           tls_port=self.tls_port, uid=self.owner.pw_uid, gid=self.owner.pw_gid,
                           protocols="imap pop3" if self.pop3 else "imap")
        if self.pop3:
            text += POP3_CONF.format(pop3_port=self.pop3_port, pop3s_port=self.pop3s_port)
        config.write_text(text + self.extra)
        return self.launch()

    def launch(self) -> "PrivateDovecot":
        """Start the configured server (again, after `stop`: the same ports and maildir)."""
        self._process = subprocess.Popen([DOVECOT, "-F", "-c", str(self.base / "dovecot.conf")],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                         start_new_session=True)
        wait_until(self._listening, 30, "the private Dovecot to answer IMAPS")
        return self

    def _listening(self) -> bool:
        assert self._process is not None
        if self._process.poll() is not None:
            stderr = self._process.stderr.read().decode() if self._process.stderr else ""
            raise RuntimeError(f"dovecot exited {self._process.returncode}: {stderr}{self.log()}")
        context = ssl.create_default_context(cafile=str(self.ca_file))
        try:
            with socket.create_connection(("127.0.0.1", self.tls_port), timeout=2) as raw:
                with context.wrap_socket(raw, server_hostname=NAME) as tls:
                    return tls.recv(100).startswith(b"* OK")
        except OSError:
            return False

    def deliver(self, raw: bytes, folder: str = "") -> Path:
        """Put a message into the maildir (INBOX, or a folder such as ".done") as an LDA does."""
        directory = self.maildir / folder if folder else self.maildir
        for sub in ("tmp", "new", "cur"):
            (directory / sub).mkdir(parents=True, exist_ok=True)
            shutil.chown(directory / sub, self.owner.pw_uid, self.owner.pw_gid)
        self._serial += 1
        name = f"{time.time_ns()}.M{self._serial}P{os.getpid()}.test"
        temporary = directory / "tmp" / name
        temporary.write_bytes(raw)
        shutil.chown(temporary, self.owner.pw_uid, self.owner.pw_gid)
        final = directory / "new" / name
        os.rename(temporary, final)
        return final

    def messages(self, folder: str = "") -> list[bytes]:
        """The bytes of every message in the folder's maildir (new/ and cur/), by file name."""
        directory = self.maildir / folder if folder else self.maildir
        files = [p for sub in ("new", "cur") if (directory / sub).is_dir()
                 for p in (directory / sub).iterdir()]
        return [p.read_bytes() for p in sorted(files, key=lambda p: p.name)]

    def log(self) -> str:
        path = self.base / "dovecot.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(10)

    def remove(self) -> None:
        shutil.rmtree(self.base, ignore_errors=True)
