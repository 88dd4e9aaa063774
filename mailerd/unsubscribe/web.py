"""The HTTP side: `GET /u/<token>` shows a page, `POST /u/<token>` unsubscribes.

A GET never changes anything: mail scanners and link previews fetch every link in a
message, so the page only offers a form that POSTs back to the same URL. The POST is
RFC 8058's one-click request (body `List-Unsubscribe=One-Click`, sent by mail clients
without any page) and the same form's submission.

Status codes: 200 once the daemon has committed the suppression (again 200 for a
replayed POST: nothing changes twice); 400 for a link that lacks a part or a POST
without the one-click body; 404 for a token that does not match (forged or from
another installation: nothing is recorded); 503 with Retry-After when the daemon
cannot be reached or does not confirm, so nobody is told they are unsubscribed
when they are not.
"""

from __future__ import annotations

import html
import logging
from typing import Protocol

from aiohttp import web

from mailerd.system.log import event
from mailerd.unsubscribe.daemon import DaemonUnavailable
from mailerd.unsubscribe.link import Incomplete, Link, genuine, parse, query_values

ONE_CLICK_FIELD = "List-Unsubscribe"
ONE_CLICK_VALUE = "One-Click"
MAX_BODY = 4096  # a one-click body is 26 bytes; anything large is not one
RETRY_AFTER = "60"

_HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",  # the link is a credential: keep it out of Referer
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Robots-Tag": "noindex",
}


class Unsubscriber(Protocol):
    async def unsubscribe(self, address: str, detail: str) -> bool: ...


KEY = web.AppKey("key", bytes)
SUPPRESSOR = web.AppKey("suppressor", Unsubscriber)


def make_app(key: bytes, suppressor: Unsubscriber) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY)
    app[KEY] = key
    app[SUPPRESSOR] = suppressor
    app.router.add_get("/u/{token}", show_page)
    app.router.add_post("/u/{token}", unsubscribe)
    return app


async def show_page(request: web.Request) -> web.Response:
    link = _genuine_link(request, "page")
    address = html.escape(link.address)
    return _page(200, "Unsubscribe",
                 f"<p>Stop sending mail to <b>{address}</b>?</p>"
                 f'<form method="post" action="">'
                 f'<input type="hidden" name="{ONE_CLICK_FIELD}" value="{ONE_CLICK_VALUE}">'
                 f'<button type="submit">Unsubscribe</button></form>')


async def unsubscribe(request: web.Request) -> web.Response:
    link = _genuine_link(request, "post")
    if not await _is_one_click(request):
        _refused("not_one_click", link=link)
        raise _error(web.HTTPBadRequest, "This request is not an unsubscribe request "
                     f"(the body must be {ONE_CLICK_FIELD}={ONE_CLICK_VALUE}).")
    try:
        new = await request.app[SUPPRESSOR].unsubscribe(
            link.address, f"one-click link, campaign {link.campaign_uid}")
    except DaemonUnavailable as exc:
        event("unsubscribe_unavailable", level=logging.ERROR, campaign_uid=link.campaign_uid,
              recipient=link.address, error=str(exc))
        raise _error(web.HTTPServiceUnavailable, "We could not record your request just now. "
                     "Nothing has changed yet; please try again in a few minutes.",
                     {"Retry-After": RETRY_AFTER}) from None
    event("unsubscribed", campaign_uid=link.campaign_uid, recipient=link.address, new=new)
    address = html.escape(link.address)
    return _page(200, "Unsubscribed", f"<p><b>{address}</b> will get no more mail from us.</p>")


def _genuine_link(request: web.Request, via: str) -> Link:
    """The request's link if its token is genuine; else the error response is raised."""
    try:
        link = parse(request.match_info["token"], query_values(request.rel_url.raw_query_string))
    except Incomplete as exc:
        _refused("incomplete", via=via, problem=str(exc))
        raise _error(web.HTTPBadRequest, "This unsubscribe link is incomplete: "
                     "please copy the whole link from the message.") from None
    if not genuine(request.app[KEY], link):
        _refused("bad_token", via=via, link=link)
        raise _error(web.HTTPNotFound, "This unsubscribe link is not valid.")
    return link


async def _is_one_click(request: web.Request) -> bool:
    """RFC 8058's body: form-encoded or multipart `List-Unsubscribe=One-Click`."""
    try:
        form = await request.post()
    except (ValueError, web.HTTPException):  # malformed form, or larger than MAX_BODY
        return False
    return form.get(ONE_CLICK_FIELD) == ONE_CLICK_VALUE


def _refused(reason: str, link: Link | None = None, **fields: str) -> None:
    where = {"campaign_uid": link.campaign_uid, "recipient": link.address} if link else {}
    event("unsubscribe_refused", level=logging.WARNING, reason=reason, **where, **fields)


def _error(kind: type[web.HTTPException], message: str,
           headers: dict[str, str] | None = None) -> web.HTTPException:
    return kind(text=_html("Unsubscribe", f"<p>{html.escape(message)}</p>"),
                content_type="text/html", headers={**_HEADERS, **(headers or {})})


def _page(status: int, title: str, body: str) -> web.Response:
    return web.Response(status=status, text=_html(title, body), content_type="text/html",
                        headers=_HEADERS)


def _html(title: str, body: str) -> str:
    return ('<!doctype html><html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<meta name="robots" content="noindex"><title>{title}</title></head>'
            f"<body><h1>{title}</h1>{body}</body></html>\n")
