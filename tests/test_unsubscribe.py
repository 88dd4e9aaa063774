"""The one-click unsubscribe endpoint (mailerd-unsubscribe): real HTTP requests to the real
service process, which adds addresses through a real daemon's control socket.

The links are the ones mailerd wrote into the List-Unsubscribe headers a fake relay
received, only pointed at the local service instead of the public https host.
"""

from __future__ import annotations

import email
import email.policy
import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterator, NamedTuple
from urllib.parse import quote, urlsplit

import pytest

from mailerd.message import tokens
from mailerd.schema.control import SuppressionEntry, SuppressionPage, SuppressList
from mailerd.testing.relay import FakeRelay

import nsboot
from conftest import Daemon, make_campaign, relay_server, wait_until
from test_systemd import PACKAGING, ROOT, hidden_by_sandbox, interpreter_paths, needs_systemd

URL_TEMPLATE = "https://example.org/u/{{ token }}?c={{ campaign_uid }}&e={{ email|urlencode }}"
ONE_CLICK = b"List-Unsubscribe=One-Click"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
ANN = "ann+news@example.com"


class Answer(NamedTuple):
    status: int
    headers: dict[str, str]
    text: str


def exchange(connection: http.client.HTTPConnection, method: str, target: str,
             body: bytes | None, headers: dict[str, str] | None) -> Answer:
    """One request on `connection`, its whole answer, and the connection closed."""
    try:
        connection.request(method, target, body=body, headers=headers or {})
        response = connection.getresponse()
        return Answer(response.status, dict(response.getheaders()),
                      response.read().decode("utf-8", "replace"))
    finally:
        connection.close()


class Service:
    """A real `python -m mailerd.unsubscribe` process for one daemon."""

    def __init__(self, daemon: Daemon, listen: str = "127.0.0.1:0", *extra: str) -> None:
        self.daemon = daemon
        self.log_path = daemon.workdir / "unsubscribe.log"
        self.unix_path = listen.removeprefix("unix:") if listen.startswith("unix:") else None
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mailerd.unsubscribe", "--listen", listen,
                 "--state-dir", str(daemon.state_dir), "--socket", daemon.socket,
                 "--timeout", "5", *extra],
                stdout=log, stderr=log, cwd=daemon.workdir)
        line = wait_until(self._listening, 20, "the endpoint to listen")
        self.base = re.search(r"url=(\S+)", line).group(1)

    def _listening(self) -> str | None:
        if self.proc.poll() is not None:
            raise AssertionError(f"the endpoint exited with {self.proc.returncode}:\n{self.log()}")
        return next((l for l in self.log().splitlines() if "unsubscribe_listening" in l), None)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_for_log(self, *texts: str, timeout: float = 10) -> None:
        """The service logs from its own thread, after the answer may have left."""
        wait_until(lambda: all(text in self.log() for text in texts), timeout,
                   f"{texts} in the endpoint's log")

    def request(self, method: str, target: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> Answer:
        """`target` is a path with its query, or a whole link (its host is ignored)."""
        parts = urlsplit(target)
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        if self.unix_path is not None:
            connection: http.client.HTTPConnection = _UnixHTTPConnection(self.unix_path)
        else:
            address = urlsplit(self.base)
            connection = http.client.HTTPConnection(address.hostname, address.port, timeout=30)
        return exchange(connection, method, path, body, headers)

    def one_click(self, link: str) -> Answer:
        """What a mail client sends for RFC 8058's one-click unsubscribe."""
        return self.request("POST", link, ONE_CLICK, FORM)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(20)


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=30)
        self.unix_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.unix_path)


@pytest.fixture
def service_factory() -> Iterator[Callable[..., Service]]:
    services: list[Service] = []

    def make(daemon: Daemon, listen: str = "127.0.0.1:0", *extra: str) -> Service:
        service = Service(daemon, listen, *extra)
        services.append(service)
        return service

    yield make
    for service in services:
        service.stop()
        assert "Traceback" not in service.log(), service.log()[-3000:]


@pytest.fixture
def daemon(daemon_factory: Callable[..., Daemon],
           relay_factory: Callable[..., FakeRelay]) -> Daemon:
    return daemon_factory({"relay": relay_server(relay_factory())}).start()


def unsubscribe_campaign(directory: Path, count: int) -> tuple[Path, Path]:
    """make_campaign's files with a List-Unsubscribe URL, and ANN (a `+` in her address)."""
    campaign, recipients = make_campaign(directory, count, extra_rows=[f"{ANN},Ann,C999999"])
    with campaign.open("a") as file:
        file.write(f'list_unsubscribe = {{ url = "{URL_TEMPLATE}" }}\n')
    return campaign, recipients


def links_received(relay: FakeRelay) -> dict[str, str]:
    """Recipient -> the https link of the List-Unsubscribe header they received."""
    links = {}
    for entry in relay.received:
        message = email.message_from_bytes(entry.data, policy=email.policy.default)
        assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        links[entry.rcpt] = re.search(r"<(https://[^>]+)>", str(message["List-Unsubscribe"])).group(1)
    return links


def suppressions(daemon: Daemon) -> list[SuppressionEntry]:
    page = daemon.call(SuppressList())
    assert isinstance(page, SuppressionPage)
    return page.entries


def link_for(daemon: Daemon, address: str, campaign_uid: str = "0123456789abcdef",
             key: bytes | None = None) -> str:
    """A link as mailerd would write it, with the daemon's key unless `key` is given."""
    key = key if key is not None else tokens.read_key(daemon.state_dir / tokens.KEY_FILE)
    token = tokens.make(key, campaign_uid, address)
    return f"/u/{token}?c={campaign_uid}&e={quote(address, safe='')}"


# ------------------------------------------------------------------ the whole loop


def test_one_click_suppresses_and_the_next_campaign_skips_the_address(
        daemon_factory: Callable[..., Daemon], relay_factory: Callable[..., FakeRelay],
        service_factory: Callable[..., Service], tmp_path: Path) -> None:
    relay = relay_factory()
    daemon = daemon_factory({"relay": relay_server(relay)}).start()
    first = daemon.enqueue(*unsubscribe_campaign(tmp_path / "first", 3))
    daemon.wait_done(first)
    links = links_received(relay)
    assert set(links) == {"user0@example.com", "user1@example.com", "user2@example.com", ANN}
    service = service_factory(daemon)

    clicked = service.one_click(links[ANN])
    assert clicked.status == 200, clicked
    assert "will get no more mail" in clicked.text
    [entry] = suppressions(daemon)
    assert (entry.email, entry.reason) == (ANN, "unsubscribed")
    assert entry.detail and "one-click" in entry.detail

    replayed = service.one_click(links[ANN])  # a client retrying, a second click
    assert replayed.status == 200, replayed
    assert [(e.email, e.reason, e.added) for e in suppressions(daemon)] == \
        [(ANN, "unsubscribed", entry.added)]

    second = daemon.enqueue(*unsubscribe_campaign(tmp_path / "second", 3))
    daemon.wait_done(second)
    assert daemon.emails(second, "suppressed") == {ANN}
    assert daemon.emails(second, "sent") == {"user0@example.com", "user1@example.com",
                                             "user2@example.com"}
    counts = relay.count_by_rcpt()
    assert counts[ANN] == 1, "nothing was sent to her after she unsubscribed"
    assert all(counts[f"user{i}@example.com"] == 2 for i in range(3))
    service.wait_for_log("unsubscribed", "new=True")


def test_a_scanner_fetching_the_link_changes_nothing(
        daemon: Daemon, service_factory: Callable[..., Service]) -> None:
    service = service_factory(daemon)
    link = link_for(daemon, ANN)
    for method in ("GET", "HEAD", "GET"):
        page = service.request(method, link)
        assert page.status == 200, page
    page = service.request("GET", link)
    assert '<form method="post"' in page.text and 'name="List-Unsubscribe" value="One-Click"' in page.text
    assert "ann+news@example.com" in page.text
    assert page.headers["Cache-Control"] == "no-store"
    assert page.headers["Referrer-Policy"] == "no-referrer"
    assert suppressions(daemon) == []

    # the page's form posts List-Unsubscribe=One-Click back to the same URL: that unsubscribes
    submitted = service.request("POST", link, b"List-Unsubscribe=One-Click", FORM)
    assert submitted.status == 200, submitted
    assert [e.email for e in suppressions(daemon)] == [ANN]


def test_a_plus_in_an_address_the_template_did_not_encode_stays_a_plus(
        daemon: Daemon, service_factory: Callable[..., Service]) -> None:
    service = service_factory(daemon)
    raw = link_for(daemon, ANN).replace(quote(ANN, safe=""), ANN)  # e=ann+news@example.com
    assert "e=ann+news@" in raw
    assert service.one_click(raw).status == 200
    assert [e.email for e in suppressions(daemon)] == [ANN]


def test_forged_and_damaged_links_change_nothing(
        daemon: Daemon, service_factory: Callable[..., Service]) -> None:
    service = service_factory(daemon)
    genuine = link_for(daemon, ANN)
    token = urlsplit(genuine).path.rsplit("/", 1)[1]
    other_key = link_for(daemon, ANN, key=b"k" * 32)
    someone_else = genuine.replace(quote(ANN, safe=""), quote("bob@example.com", safe=""))
    other_campaign = genuine.replace("c=0123456789abcdef", "c=fedcba9876543210")
    flipped = genuine.replace(token, token[:-1] + ("A" if token[-1] != "A" else "B"))
    for forged in (other_key, someone_else, other_campaign, flipped):
        answer = service.one_click(forged)
        assert answer.status == 404, (forged, answer)
        assert "not valid" in answer.text
        assert service.request("GET", forged).status == 404
    damaged = [genuine.split("?")[0], genuine.replace("&e=", "&x="), f"/u/{token[:10]}?c=0&e=a%40b",
               genuine.replace(quote(ANN, safe=""), "ann%0D%0Abcc%40example.com")]
    for link in damaged:
        answer = service.one_click(link)
        assert answer.status == 400, (link, answer)
        assert "incomplete" in answer.text
    # a genuine link, but not a one-click request: a plain POST, another field, a huge body
    for body in (b"", b"List-Unsubscribe=Yes", b"x=" + b"y" * 10_000):
        answer = service.request("POST", genuine, body, FORM)
        assert answer.status in (400, 413), (body[:30], answer)
    assert suppressions(daemon) == []
    assert service.request("DELETE", genuine).status == 405
    service.wait_for_log("reason=bad_token", "reason=incomplete")


def test_daemon_unreachable_is_503_and_the_retry_later_succeeds(
        daemon: Daemon, service_factory: Callable[..., Service]) -> None:
    service = service_factory(daemon)
    link = link_for(daemon, ANN)
    assert daemon.terminate() == 0

    answer = service.one_click(link)
    assert answer.status == 503, answer
    assert answer.headers["Retry-After"] == "60"
    assert "Nothing has changed" in answer.text and "no more mail" not in answer.text
    service.wait_for_log("unsubscribe_unavailable")

    daemon.start()
    assert suppressions(daemon) == [], "the 503 did not record anything"
    answer = service.one_click(link)
    assert answer.status == 200, answer
    assert [(e.email, e.reason) for e in suppressions(daemon)] == [(ANN, "unsubscribed")]


def test_listens_on_a_unix_socket_with_the_key_handed_in(
        daemon: Daemon, service_factory: Callable[..., Service]) -> None:
    """As the shipped unit runs it: the key as a copy (systemd's LoadCredential=), not
    read from the daemon's state directory; a Unix socket for the proxy."""
    copy = daemon.workdir / "credentials" / "unsubscribe.key"
    copy.parent.mkdir()
    copy.write_bytes((daemon.state_dir / tokens.KEY_FILE).read_bytes())
    path = daemon.workdir / "http.sock"
    service = service_factory(daemon, f"unix:{path}", "--key-file", str(copy),
                              "--state-dir", str(daemon.workdir / "elsewhere"))
    link = link_for(daemon, ANN)
    assert service.request("GET", link).status == 200
    assert service.one_click(link).status == 200
    assert [e.email for e in suppressions(daemon)] == [ANN]


@pytest.mark.parametrize("args, message", [
    (["--state-dir", "{tmp}/none"], "unsubscribe.key does not exist: start mailerd once"),
    (["--state-dir", "{tmp}", "--listen", "0.0.0.0:8480"], "'0.0.0.0' is not a loopback address"),
    (["--state-dir", "{tmp}", "--listen", "8480"], "use HOST:PORT or unix:PATH"),
])
def test_refuses_to_start_with_a_clear_message(tmp_path: Path, args: list[str],
                                               message: str) -> None:
    tokens.load_or_create_key(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "mailerd.unsubscribe", *(a.format(tmp=tmp_path) for a in args)],
        capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert message in result.stderr
    assert "Traceback" not in result.stderr


# ------------------------------------------------------------------ the shipped unit


UNIT_CONFIG = """\
[daemon]
socket_group = "mailerd"
log_level = "info"

[servers.relay]
host = "127.0.0.1"
port = 2525
connections = 1
timeout = "2s"
"""

HTTP_REQUEST = """\
import http.client, sys
connection = http.client.HTTPConnection("127.0.0.1", 8480, timeout=20)
connection.request(sys.argv[1], sys.argv[2], body=sys.argv[3].encode() or None,
                   headers={"Content-Type": "application/x-www-form-urlencoded"})
print(connection.getresponse().status)
"""


def unit_dropin() -> str:
    """Only what this machine needs (as tests/test_systemd.py's drop-in): the checkout on
    PYTHONPATH, and the interpreter visible when it lives where ProtectHome= hides it."""
    lines = ["[Service]", f"Environment=PYTHONPATH={ROOT}", "Environment=PYTHONDONTWRITEBYTECODE=1"]
    hidden = [p for p in interpreter_paths() if hidden_by_sandbox(p)]
    if hidden:
        lines.append("ProtectHome=tmpfs")
        lines += [f"BindReadOnlyPaths={p}" for p in hidden]
    return "\n".join(lines) + "\n"


@pytest.fixture
def unit_system(tmp_path: Path) -> Iterator[nsboot.SystemdNamespace]:
    host = tmp_path / "host"
    host.mkdir(mode=0o755)
    bin_dir = tmp_path / "opt" / "mailerd" / "bin"
    bin_dir.mkdir(parents=True)
    for name, module in (("mailerd", "mailerd"), ("mailerd-unsubscribe", "mailerd.unsubscribe")):
        (bin_dir / name).write_text(f'#!/bin/sh\nexec {sys.executable} -m {module} "$@"\n')
        (bin_dir / name).chmod(0o755)
    ns = nsboot.SystemdNamespace(tmp_path / "ns", host, binds=interpreter_paths(),
                                 mounts={"/opt": tmp_path / "opt"})
    for name in ("mailerd.service", "mailerd-unsubscribe.service"):
        ns.etc(f"systemd/system/{name}").write_text((PACKAGING / name).read_text())
        ns.etc(f"systemd/system/{name}.d/test.conf").write_text(unit_dropin())
    ns.etc("sysusers.d/mailerd.conf").write_text((PACKAGING / "mailerd.sysusers.conf").read_text())
    ns.etc("tmpfiles.d/mailerd.conf").write_text((PACKAGING / "mailerd.tmpfiles.conf").read_text())
    ns.etc("mailerd/mailerd.toml").write_text(UNIT_CONFIG)
    with nsboot.booted(ns, 80):
        yield ns


@needs_systemd
def test_the_shipped_unit_unsubscribes_as_a_member_without_the_daemons_files(
        unit_system: nsboot.SystemdNamespace) -> None:
    ns = unit_system
    ns.run(["systemd-sysusers", "/etc/sysusers.d/mailerd.conf"])
    ns.run(["systemd-tmpfiles", "--create", "/etc/tmpfiles.d/mailerd.conf"])
    verify = ns.run(["systemd-analyze", "verify", "/etc/systemd/system/mailerd-unsubscribe.service"],
                    check=False)
    assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr
    ns.systemctl("start", "mailerd")
    ns.systemctl("start", "mailerd-unsubscribe")  # Type=notify: returns after READY=1
    assert ns.show("mailerd-unsubscribe", "ActiveState") == "active"

    pid = ns.show("mailerd-unsubscribe", "MainPID")
    uid, gid = ns.run(["ps", "-o", "uid=,gid=", "-p", pid]).stdout.split()
    assert uid != ns.run(["id", "-u", "mailerd"]).stdout.strip(), "not the daemon's user"
    assert gid == ns.run(["id", "-g", "mailerd"]).stdout.strip(), "in the daemon's group"
    # the key came in as a credential; the daemon's state directory stays closed to it
    closed = ns.run(["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
                     "cat", "/var/lib/mailerd/unsubscribe.key"], check=False)
    assert closed.returncode != 0 and "Permission denied" in closed.stderr, closed

    key = (ns.overlays["/var/lib"][0] / "mailerd" / tokens.KEY_FILE).read_bytes()
    token = tokens.make(key, "0123456789abcdef", ANN)
    link = f"/u/{token}?c=0123456789abcdef&e={quote(ANN, safe='')}"
    request = [sys.executable, "-c", HTTP_REQUEST]
    assert ns.run([*request, "GET", link, ""]).stdout.strip() == "200"
    assert ns.run([*request, "POST", link, "List-Unsubscribe=One-Click"]).stdout.strip() == "200"
    listed = ns.run([sys.executable, "-m", "mailerctl", "--socket", "/run/mailerd/control.sock",
                     "suppress", "list", "--json"], env={"PYTHONPATH": str(ROOT)}).stdout
    assert [(e["email"], e["reason"]) for e in json.loads(listed)] == [(ANN, "unsubscribed")]
    events = ns.run(["journalctl", "--no-pager", "-o", "cat", "-u", "mailerd-unsubscribe"]).stdout
    assert "unsubscribed campaign_uid=0123456789abcdef" in events, events

    ns.systemctl("stop", "mailerd")  # the daemon gone: 503, not a false 200
    assert ns.run([*request, "POST", link, "List-Unsubscribe=One-Click"]).stdout.strip() == "503"
    ns.systemctl("stop", "mailerd-unsubscribe")
    assert ns.show("mailerd-unsubscribe", "Result") == "success"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_security_exposure_of_the_shipped_unit() -> None:
    """`systemd-analyze security` rates the endpoint's unit 2.0 or lower (offline; 1.1 now)."""
    out = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--no-pager",
         str(PACKAGING / "mailerd-unsubscribe.service")],
        capture_output=True, text=True, env={**os.environ, "SYSTEMD_COLORS": "0"})
    match = re.search(r"Overall exposure level for mailerd-unsubscribe\.service: (\d+\.\d+)",
                      out.stdout)
    assert match, out.stdout + out.stderr
    assert float(match[1]) <= 2.0, out.stdout
