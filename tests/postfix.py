"""A private Postfix relay for tests: Debian's postfix and dovecot-core, started on loopback.

Nothing of the host's mail system is used or touched: the instance has its own
config directory (`postfix -c DIR`), queue and data directories, log file
(`maillog_file`) and port; SASL goes through a private Dovecot (`dovecot -c FILE`)
whose auth socket and passwd-file live in the same scratch directory. The relay
forwards everything to `relayhost` (the test's sink on another loopback port), or
a domain listed in `transports` to its own next hop (another sink). The DSNs it
writes (bounces, with DELAY_NOTICES also "delayed mail" warnings) go the same way.
TLS uses a certificate for `relay.test` signed by a CA made for the test (openssl).

Needs root (Postfix's master runs as root and drops to `mail_owner` postfix) and
the binaries; `missing()` says what is absent so tests can skip with that reason.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

from mailerd.testing.ports import free_port
from mailerd.testing.waiting import wait_until

POSTFIX = "/usr/sbin/postfix"
DOVECOT = "/usr/sbin/dovecot"
OPENSSL = "/usr/bin/openssl"
TLS_NAME = "relay.test"

# main.cf settings that make Postfix retry deferred mail every second or two and send the
# sender a "delayed mail" DSN (RFC 3464, Action: delayed) once a message has waited a
# second: the next retry after the first deferral sends it, within a few seconds.
DELAY_NOTICES = {
    "delay_warning_time": "1s",
    "queue_run_delay": "1s",
    "minimal_backoff_time": "1s",
    "maximal_backoff_time": "2s",
}


def missing() -> str | None:
    """Why a private Postfix cannot run here, or None."""
    for binary in (POSTFIX, DOVECOT, OPENSSL):
        if not os.access(binary, os.X_OK):
            return f"{binary} is not installed (scripts/setup.sh installs postfix, dovecot-core, openssl)"
    if os.geteuid() != 0:
        return "a private Postfix instance needs root (master drops to the postfix user)"
    try:
        import pwd
        import grp

        pwd.getpwnam("postfix")
        grp.getgrnam("postdrop")
        pwd.getpwnam("dovecot")
        pwd.getpwnam("dovenull")
    except KeyError as exc:
        return f"user or group {exc} is missing (created by Debian's postfix/dovecot-core packages)"
    return None


def _run(*args: str, env: dict[str, str] | None = None) -> None:
    result = subprocess.run(args, capture_output=True, text=True, timeout=60, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited {result.returncode}:\n{result.stdout}{result.stderr}")


def make_test_ca(directory: Path, name: str = TLS_NAME) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for `name` signed by it: (ca.crt, server.crt, server.key)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_crt = directory / "ca.key", directory / "ca.crt"
    key, csr, crt = directory / "relay.key", directory / "relay.csr", directory / "relay.crt"
    ext = directory / "relay.ext"
    _run(OPENSSL, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", "/CN=mailerd test CA", "-keyout", str(ca_key), "-out", str(ca_crt),
         "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    _run(OPENSSL, "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
         "-keyout", str(key), "-out", str(csr))
    ext.write_text(f"subjectAltName=DNS:{name}\nbasicConstraints=CA:FALSE\n"
                   "extendedKeyUsage=serverAuth\n")
    _run(OPENSSL, "x509", "-req", "-in", str(csr), "-CA", str(ca_crt), "-CAkey", str(ca_key),
         "-CAcreateserial", "-days", "2", "-extfile", str(ext), "-out", str(crt))
    key.chmod(0o600)
    return ca_crt, crt, key


MASTER_CF = """\
{listen} inet n - n - - smtpd
{listen_tls} inet n - n - - smtpd -o smtpd_tls_wrappermode=yes
pickup    unix  n - n 60 1 pickup
cleanup   unix  n - n -  0 cleanup
qmgr      unix  n - n 300 1 qmgr
tlsmgr    unix  - - n 1000? 1 tlsmgr
rewrite   unix  - - n - - trivial-rewrite
bounce    unix  - - n - 0 bounce
defer     unix  - - n - 0 bounce
trace     unix  - - n - 0 bounce
verify    unix  - - n - 1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n - - proxymap
proxywrite unix - - n - 1 proxymap
smtp      unix  - - n - - smtp
relay     unix  - - n - - smtp
showq     unix  n - n - - showq
error     unix  - - n - - error
retry     unix  - - n - - error
discard   unix  - - n - - discard
local     unix  - n n - - local
lmtp      unix  - - n - - lmtp
anvil     unix  - - n - 1 anvil
scache    unix  - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
"""

DOVECOT_CONF = """\
base_dir = {base}/dovecot/run
state_dir = {base}/dovecot/state
log_path = {base}/dovecot.log
protocols =
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {base}/dovecot/passwd
}}
userdb {{
  driver = static
  args = uid=nobody gid=nogroup home=/nonexistent
}}
service auth {{
  unix_listener {base}/dovecot/auth-postfix {{
    mode = 0660
    user = postfix
    group = postfix
  }}
}}
"""


class PrivatePostfix:
    """One private Postfix (+ Dovecot auth) on 127.0.0.1:`port`, relaying to `relayhost_port`.

    `settings` are extra main.cf lines (anvil limits ...); `recipient_access` maps an
    address to the reply Postfix gives to RCPT for it (check_recipient_access);
    `transports` maps a domain to its next hop instead of relayhost (transport_maps),
    e.g. {"slow.example": "smtp:[127.0.0.1]:2526"}.
    """

    def __init__(self, relayhost_port: int, *, settings: dict[str, str] | None = None,
                 recipient_access: dict[str, str] | None = None,
                 users: dict[str, str] | None = None,
                 transports: dict[str, str] | None = None) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="mailerd-postfix-", dir="/var/tmp"))
        self.base.chmod(0o755)  # postfix and dovecot users must reach their files
        self.conf = self.base / "conf"
        self.port = free_port()  # SMTP with STARTTLS
        self.tls_port = free_port()  # implicit TLS (smtpd_tls_wrappermode)
        self.relayhost_port = relayhost_port
        self.settings = settings or {}
        self.recipient_access = recipient_access or {}
        self.users = users or {}
        self.transports = transports or {}
        self.maillog = self.base / "maillog"
        self.ca_file: Path | None = None
        self._dovecot: subprocess.Popen[bytes] | None = None
        self._started = False

    # ------------------------------------------------------------ set-up

    def _main_cf(self, cert: Path, key: Path) -> str:
        base = self.base
        lines = {
            "compatibility_level": "3.6",
            "queue_directory": f"{base}/queue",
            "data_directory": f"{base}/data",
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "myhostname": TLS_NAME,
            "mydomain": TLS_NAME,
            "myorigin": TLS_NAME,
            "mydestination": "",
            "local_recipient_maps": "",
            "alias_maps": "",
            "alias_database": "",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "relay_domains": "",
            "relayhost": f"[127.0.0.1]:{self.relayhost_port}",
            "transport_maps": f"texthash:{self.conf}/transport",
            "smtp_tls_security_level": "none",
            "smtpd_tls_security_level": "may",
            "smtpd_tls_cert_file": str(cert),
            "smtpd_tls_key_file": str(key),
            "smtpd_tls_auth_only": "yes",  # AUTH is offered only after STARTTLS
            "smtpd_tls_loglevel": "1",
            "smtpd_sasl_auth_enable": "yes",
            "smtpd_sasl_type": "dovecot",
            "smtpd_sasl_path": f"{base}/dovecot/auth-postfix",
            "smtpd_relay_restrictions": "permit_sasl_authenticated, reject_unauth_destination",
            "smtpd_recipient_restrictions":
                f"check_recipient_access texthash:{self.conf}/recipient_access, permit",
            # loopback is in mynetworks, which anvil exempts by default: the limits must apply
            "smtpd_client_event_limit_exceptions": "",
            "maillog_file": str(self.maillog),
            "biff": "no",
            "append_dot_mydomain": "no",
            "readme_directory": "no",
            **self.settings,
        }
        return "".join(f"{k} = {v}\n" for k, v in lines.items())

    def start(self) -> "PrivatePostfix":
        self.conf.mkdir()
        for sub in ("queue", "data", "dovecot/run", "dovecot/state"):
            (self.base / sub).mkdir(parents=True)
        self.ca_file, cert, key = make_test_ca(self.base / "tls")
        (self.conf / "main.cf").write_text(self._main_cf(cert, key))
        (self.conf / "master.cf").write_text(MASTER_CF.format(
            listen=f"127.0.0.1:{self.port}", listen_tls=f"127.0.0.1:{self.tls_port}"))
        (self.conf / "recipient_access").write_text(
            "".join(f"{address} {reply}\n" for address, reply in self.recipient_access.items()))
        (self.conf / "transport").write_text(
            "".join(f"{domain} {nexthop}\n" for domain, nexthop in self.transports.items()))
        self._start_dovecot()
        shutil.chown(self.base / "data", "postfix")
        _run(POSTFIX, "-c", str(self.conf), "check")  # creates the queue directory tree
        _run(POSTFIX, "-c", str(self.conf), "start")
        self._started = True
        wait_until(self._listening, 30, "the private Postfix to listen")
        return self

    def _start_dovecot(self) -> None:
        passwd = self.base / "dovecot" / "passwd"
        passwd.write_text("".join(f"{user}:{{PLAIN}}{password}\n"
                                  for user, password in self.users.items()))
        passwd.chmod(0o640)
        shutil.chown(passwd, "root", "dovecot")  # read by dovecot's auth process (user dovecot)
        config = self.base / "dovecot.conf"
        config.write_text(DOVECOT_CONF.format(base=self.base))
        self._dovecot = subprocess.Popen([DOVECOT, "-F", "-c", str(config)],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                         start_new_session=True)
        socket_path = self.base / "dovecot" / "auth-postfix"
        wait_until(lambda: self._dovecot_alive() and socket_path.exists(), 20,
                   "dovecot's auth socket")

    def _dovecot_alive(self) -> bool:
        assert self._dovecot is not None
        if self._dovecot.poll() is not None:
            raise RuntimeError(f"dovecot exited {self._dovecot.returncode}: "
                               f"{self._dovecot.stderr.read().decode() if self._dovecot.stderr else ''}"
                               f"{self.log('dovecot.log')}")
        return True

    def _listening(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                return s.recv(100).startswith(b"220")
        except OSError:
            return False

    # ------------------------------------------------------------ observing

    def log(self, name: str = "maillog") -> str:
        path = self.base / name
        return path.read_text(errors="replace") if path.exists() else ""

    def count(self, needle: str) -> int:
        return sum(needle in line for line in self.log().splitlines())

    # ------------------------------------------------------------ tear-down

    def stop(self) -> None:
        if self._started:
            subprocess.run([POSTFIX, "-c", str(self.conf), "stop"], capture_output=True, timeout=60)
            self._kill_master()
            self._started = False
        if self._dovecot is not None and self._dovecot.poll() is None:
            self._dovecot.terminate()
            try:
                self._dovecot.wait(10)
            except subprocess.TimeoutExpired:
                self._dovecot.kill()
                self._dovecot.wait(10)

    def _kill_master(self) -> None:
        """`postfix stop` returns before master is gone: wait for it, by its pid file."""
        pid_file = self.base / "queue" / "pid" / "master.pid"
        try:
            pid = int(pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return

        def gone() -> bool:
            try:
                os.kill(pid, 0)
                return False
            except ProcessLookupError:
                return True
        try:
            wait_until(gone, 10, "postfix master to exit")
        except AssertionError:
            os.kill(pid, signal.SIGKILL)

    def remove(self) -> None:
        shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> "PrivatePostfix":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
