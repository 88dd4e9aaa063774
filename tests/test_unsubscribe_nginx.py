"""The one-click endpoint behind the shipped nginx example (packaging/nginx-unsubscribe.conf).

A real daemon, the real `mailerd-unsubscribe` process and a private nginx (tests/nginx.py)
serving the shipped server blocks over HTTPS on loopback; every request goes through
nginx, the way a mail client's one-click POST reaches a production install.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import quote, urlsplit

import pytest

import nginx
from conftest import Daemon, relay_server
from mailerd.testing.relay import FakeRelay
from test_unsubscribe import (ANN, FORM, ONE_CLICK, Service, link_for, links_received,  # noqa: F401
                              service_factory, suppressions, unsubscribe_campaign)

pytestmark = pytest.mark.skipif(nginx.missing() is not None, reason=nginx.missing() or "")

FLOOD_BOUND = 200
Proxy = Callable[[Daemon], tuple[Service, nginx.PrivateNginx]]


@pytest.fixture
def proxied(service_factory: Callable[..., Service]) -> Iterator[Proxy]:
    """For a daemon: its endpoint process, and nginx in front of it."""
    servers: list[nginx.PrivateNginx] = []

    def make(daemon: Daemon) -> tuple[Service, nginx.PrivateNginx]:
        service = service_factory(daemon)
        server = nginx.PrivateNginx(urlsplit(service.base).port or 0)
        servers.append(server)
        return service, server.start()

    yield make
    for server in servers:
        server.stop()
        assert "[emerg]" not in server.log() and "[crit]" not in server.log(), server.log()
        server.remove()


def path_of(link: str) -> str:
    """The path and query of an https link from a List-Unsubscribe header."""
    parts = urlsplit(link)
    return f"{parts.path}?{parts.query}"


def suppression_listed(daemon: Daemon) -> list[tuple[str, str]]:
    """What `mailerctl suppress list --json` shows the user."""
    listed = json.loads(daemon.ctl("suppress", "list", "--json").stdout)
    return [(entry["email"], entry["reason"]) for entry in listed]


def test_one_click_through_nginx_suppresses_and_the_next_campaign_skips_the_address(
        daemon_factory: Callable[..., Daemon], relay_factory: Callable[..., FakeRelay],
        proxied: Proxy, tmp_path: Path) -> None:
    relay = relay_factory()
    daemon = daemon_factory({"relay": relay_server(relay)}).start()
    first = daemon.enqueue(*unsubscribe_campaign(tmp_path / "first", 3))
    daemon.wait_done(first)
    link = path_of(links_received(relay)[ANN])
    service, server = proxied(daemon)

    clicked = server.request("POST", link, ONE_CLICK, FORM)
    assert clicked.status == 200, clicked
    assert "will get no more mail" in clicked.text
    assert suppression_listed(daemon) == [(ANN, "unsubscribed")]
    [entry] = suppressions(daemon)

    replayed = server.request("POST", link, ONE_CLICK, FORM)
    assert replayed.status == 200, replayed
    assert [(e.email, e.reason, e.added) for e in suppressions(daemon)] == \
        [(ANN, "unsubscribed", entry.added)]
    service.wait_for_log("new=True", "new=False")

    second = daemon.enqueue(*unsubscribe_campaign(tmp_path / "second", 3))
    daemon.wait_done(second)
    assert daemon.emails(second, "suppressed") == {ANN}
    assert relay.count_by_rcpt()[ANN] == 1

    # the example keeps the links (they hold the address and the token) out of its access log
    token = urlsplit(link).path.rsplit("/", 1)[1]
    assert quote(ANN, safe="") not in server.log("access.log") and token not in server.log("access.log")


def test_a_get_through_nginx_shows_the_page_and_changes_nothing(
        daemon_factory: Callable[..., Daemon], relay_factory: Callable[..., FakeRelay],
        proxied: Proxy) -> None:
    daemon = daemon_factory({"relay": relay_server(relay_factory())}).start()
    _, server = proxied(daemon)
    link = link_for(daemon, ANN)
    for method in ("GET", "HEAD", "GET"):  # a scanner, a link preview
        assert server.request(method, link).status == 200
    page = server.request("GET", link)
    assert '<form method="post"' in page.text and ANN in page.text
    assert page.headers["Cache-Control"] == "no-store"
    # plain http only redirects to https: whatever the method, nobody is unsubscribed there
    for method in ("GET", "POST"):
        redirected = server.request(method, link, ONE_CLICK if method == "POST" else None, FORM,
                                    tls=False)
        assert redirected.status == 301, redirected
        assert redirected.headers["Location"].startswith(f"https://{nginx.SERVER_NAME}/u/")
    assert suppressions(daemon) == []


def test_forged_links_and_other_methods_through_nginx_change_nothing(
        daemon_factory: Callable[..., Daemon], relay_factory: Callable[..., FakeRelay],
        proxied: Proxy) -> None:
    daemon = daemon_factory({"relay": relay_server(relay_factory())}).start()
    service, server = proxied(daemon)
    genuine = link_for(daemon, ANN)
    forged = link_for(daemon, ANN, key=b"k" * 32)
    someone_else = genuine.replace(quote(ANN, safe=""), quote("bob@example.com", safe=""))
    for link in (forged, someone_else):
        answer = server.request("POST", link, ONE_CLICK, FORM)
        assert answer.status == 404, (link, answer)
        assert "not valid" in answer.text  # the endpoint's answer, passed through
    assert server.request("PUT", genuine, ONE_CLICK, FORM).status == 403  # limit_except
    assert server.request("DELETE", genuine).status == 403
    assert server.request("POST", "/other", ONE_CLICK, FORM).status == 404  # only /u/ is proxied
    assert suppressions(daemon) == []
    service.wait_for_log("reason=bad_token")


def test_a_flood_from_one_client_is_429_and_changes_nothing(
        daemon_factory: Callable[..., Daemon], relay_factory: Callable[..., FakeRelay],
        proxied: Proxy) -> None:
    daemon = daemon_factory({"relay": relay_server(relay_factory())}).start()
    service, server = proxied(daemon)
    forged = link_for(daemon, ANN, key=b"k" * 32)
    answers: list[int] = []
    for _ in range(FLOOD_BOUND):  # 5 r/s with a burst of 20 allowed: far more comes at once
        answers.append(server.request("POST", forged, ONE_CLICK, FORM).status)
        if answers[-1] != 404:
            break
    assert answers[-1] == 429, answers
    assert answers.count(404) >= 20, "the burst the example allows was let through"
    assert suppressions(daemon) == []


def test_daemon_stopped_is_503_through_nginx_and_the_retry_later_succeeds(
        daemon_factory: Callable[..., Daemon], relay_factory: Callable[..., FakeRelay],
        proxied: Proxy) -> None:
    daemon = daemon_factory({"relay": relay_server(relay_factory())}).start()
    service, server = proxied(daemon)
    link = link_for(daemon, ANN)
    assert daemon.terminate() == 0

    answer = server.request("POST", link, ONE_CLICK, FORM)
    assert answer.status == 503, answer
    assert answer.headers["Retry-After"] == "60"
    assert "Nothing has changed" in answer.text and "no more mail" not in answer.text

    daemon.start()
    assert suppressions(daemon) == [], "the 503 did not record anything"
    assert server.request("POST", link, ONE_CLICK, FORM).status == 200
    assert suppression_listed(daemon) == [(ANN, "unsubscribed")]

    service.stop()  # the endpoint itself gone: nginx's own error, still no 200
    assert server.request("POST", link, ONE_CLICK, FORM).status == 502
