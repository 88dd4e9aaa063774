"""A private nginx for tests: Debian's nginx serving packaging/nginx-unsubscribe.conf on loopback.

The shipped file itself is the site: only its listen ports (443 and 80 become free ports
on 127.0.0.1, and on ::1 where the machine has IPv6 loopback), its certificate paths (a
certificate for its server_name from a CA made for the test, tests/postfix.py's
make_test_ca) and the port of proxy_pass are replaced; each replacement must match, so a
changed example fails here instead of being tested half. Around it, a minimal main
config of our own: own prefix (`-p`), config (`-c`), error log (`-e`), pid file, temp
directories and access log, all in one scratch directory; `daemon off` so the test owns
the master process and stops it. Nothing of the host's nginx is read or touched.
"""

from __future__ import annotations

import http.client
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
from pathlib import Path

from mailerd.testing.ports import free_port
from mailerd.testing.waiting import wait_until
from postfix import make_test_ca
from test_unsubscribe import Answer, exchange

NGINX = "/usr/sbin/nginx"
SHIPPED = Path(__file__).resolve().parent.parent / "packaging" / "nginx-unsubscribe.conf"
SERVER_NAME = "lists.example.org"  # the shipped file's server_name

MAIN_CONF = """\
daemon off;
{user}worker_processes 1;
pid {base}/nginx.pid;
error_log {base}/error.log info;
events {{
    worker_connections 64;
}}
http {{
    access_log {base}/access.log;
    client_body_temp_path {base}/temp/body;
    proxy_temp_path {base}/temp/proxy;
    fastcgi_temp_path {base}/temp/fastcgi;
    uwsgi_temp_path {base}/temp/uwsgi;
    scgi_temp_path {base}/temp/scgi;
    include {base}/site.conf;
}}
"""


def missing() -> str | None:
    """Why a private nginx cannot run here, or None."""
    if not os.access(NGINX, os.X_OK):
        return f"{NGINX} is not installed (scripts/setup.sh installs nginx)"
    return None


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def _replace(text: str, pattern: str, replacement: str, count: int) -> str:
    new, found = re.subn(pattern, replacement, text, flags=re.MULTILINE)
    if found != count:
        raise AssertionError(f"{SHIPPED}: expected {count} line(s) matching {pattern!r}, found {found}")
    return new


def site_config(shipped: str, *, https_port: int, http_port: int, backend_port: int,
                cert: Path, key: Path, ipv6: bool) -> str:
    """The shipped server blocks with only ports, certificate paths and the backend port changed."""
    text = _replace(shipped, r"^(\s*listen\s+)443(\s+ssl;)", rf"\g<1>127.0.0.1:{https_port}\2", 1)
    text = _replace(text, r"^(\s*listen\s+)80;", rf"\g<1>127.0.0.1:{http_port};", 1)
    def v6(port: int) -> str:  # a machine without IPv6 loopback: that line is left out
        return rf"\g<1>[::1]:{port}\2" if ipv6 else r"# \g<0>"
    text = _replace(text, r"^(\s*listen\s+)\[::\]:443(\s+ssl;)", v6(https_port), 1)
    text = _replace(text, r"^(\s*listen\s+)\[::\]:80(;)", v6(http_port), 1)
    text = _replace(text, r"^(\s*ssl_certificate\s+)\S+;", rf"\g<1>{cert};", 1)
    text = _replace(text, r"^(\s*ssl_certificate_key\s+)\S+;", rf"\g<1>{key};", 1)
    return _replace(text, r"^(\s*proxy_pass\s+http://127\.0\.0\.1:)8480;", rf"\g<1>{backend_port};", 1)


class PrivateNginx:
    """The shipped example on 127.0.0.1: HTTPS on `https_port`, plain HTTP on `http_port`,
    proxying /u/ to 127.0.0.1:`backend_port`."""

    def __init__(self, backend_port: int) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="mailerd-nginx-", dir="/var/tmp"))
        self.base.chmod(0o755)  # the workers (nobody when started as root) use temp/
        self.backend_port = backend_port
        self.https_port, self.http_port = free_port(), free_port()
        self.ca_file: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None

    def _command(self, *extra: str) -> list[str]:
        return [NGINX, "-p", f"{self.base}/", "-c", str(self.base / "nginx.conf"),
                "-e", str(self.base / "error.log"), *extra]

    def start(self) -> "PrivateNginx":
        (self.base / "temp").mkdir()
        self.ca_file, cert, key = make_test_ca(self.base / "tls", SERVER_NAME)
        (self.base / "site.conf").write_text(site_config(
            SHIPPED.read_text(), https_port=self.https_port, http_port=self.http_port,
            backend_port=self.backend_port, cert=cert, key=key, ipv6=ipv6_loopback()))
        user = "user nobody nogroup;\n" if os.geteuid() == 0 else ""
        (self.base / "nginx.conf").write_text(MAIN_CONF.format(base=self.base, user=user))
        checked = subprocess.run(self._command("-t"), capture_output=True, text=True, timeout=30)
        if checked.returncode != 0:
            raise RuntimeError(f"nginx -t refused the config:\n{checked.stderr}")
        self._process = subprocess.Popen(self._command(), stdout=subprocess.DEVNULL,
                                         stderr=subprocess.PIPE, start_new_session=True)
        wait_until(self._listening, 20, "the private nginx to answer HTTPS")
        return self

    def _listening(self) -> bool:
        assert self._process is not None
        if self._process.poll() is not None:
            stderr = self._process.stderr.read().decode() if self._process.stderr else ""
            raise RuntimeError(f"nginx exited {self._process.returncode}: {stderr}{self.log()}")
        try:
            with socket.create_connection(("127.0.0.1", self.https_port), timeout=1):
                return True
        except OSError:
            return False

    def request(self, method: str, target: str, body: bytes | None = None,
                headers: dict[str, str] | None = None, *, tls: bool = True) -> Answer:
        """`target` is a path with its query; sent to lists.example.org (by its name, checked
        against the test CA) on the private HTTPS port, or the plain HTTP one."""
        connection: http.client.HTTPConnection
        if tls:
            context = ssl.create_default_context(cafile=str(self.ca_file))
            connection = _LoopbackHTTPS(self.https_port, context)
        else:
            connection = _LoopbackHTTP(self.http_port)
        return exchange(connection, method, target, body, headers)

    def log(self, name: str = "error.log") -> str:
        path = self.base / name
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGQUIT)  # graceful: workers finish, then exit
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self._process.pid, signal.SIGKILL)
                self._process.wait(10)

    def remove(self) -> None:
        shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> "PrivateNginx":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self.remove()


class _LoopbackHTTPS(http.client.HTTPSConnection):
    """HTTPS to 127.0.0.1 that presents and checks the name SERVER_NAME (SNI, Host, certificate)."""

    def __init__(self, port: int, context: ssl.SSLContext) -> None:
        super().__init__(SERVER_NAME, port, context=context, timeout=30)
        self._tls = context

    def connect(self) -> None:
        raw = socket.create_connection(("127.0.0.1", self.port), self.timeout)
        self.sock = self._tls.wrap_socket(raw, server_hostname=SERVER_NAME)


class _LoopbackHTTP(http.client.HTTPConnection):
    def __init__(self, port: int) -> None:
        super().__init__(SERVER_NAME, port, timeout=30)

    def connect(self) -> None:
        self.sock = socket.create_connection(("127.0.0.1", self.port), self.timeout)
