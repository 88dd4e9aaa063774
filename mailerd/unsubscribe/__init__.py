"""The one-click unsubscribe endpoint (RFC 8058): `mailerd-unsubscribe`.

A small HTTP service behind a reverse proxy that terminates TLS. The link in a
campaign's List-Unsubscribe header is `https://HOST/u/{{ token }}?c={{ campaign_uid }}&e={{
email|urlencode }}`: the token (message/tokens.py) proves that mailerd wrote that link to
that address for that campaign, so nobody can unsubscribe anyone else.

- link.py    what a link says and whether its token is genuine (no I/O)
- daemon.py  the suppression, added through the daemon's control socket
- web.py     the HTTP routes: GET shows a page (never unsubscribes), POST unsubscribes
- main.py    command line, key, listening socket, lifetime
"""
