"""`mailerd-unsubscribe` (or `python -m mailerd.unsubscribe`): run the endpoint.

It reads the daemon's unsubscribe key from the state directory (it never makes one:
tokens must be the daemon's), listens on a loopback port or a Unix socket for a reverse
proxy that terminates TLS, and adds addresses through the daemon's control socket. It
keeps no state of its own, so any number may run and a restart loses nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import os
import signal
import sys
from pathlib import Path

from aiohttp import web

from mailerd.message import tokens
from mailerd.system import notify
from mailerd.system.log import event, setup_logging, stop_logging
from mailerd.unsubscribe.daemon import Suppressor
from mailerd.unsubscribe.web import make_app

DEFAULT_STATE_DIR = "/var/lib/mailerd"
DEFAULT_SOCKET = "/run/mailerd/control.sock"
DEFAULT_LISTEN = "127.0.0.1:8480"
UNIX_PREFIX = "unix:"
EXIT_START = 1
EXIT_USAGE = 2


class StartError(Exception):
    """Why the endpoint cannot start; one line for the user, no traceback."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="mailerd-unsubscribe",
        description="One-click unsubscribe endpoint (RFC 8058) for mailerd, behind a reverse proxy.")
    p.add_argument("--listen", default=DEFAULT_LISTEN,
                   help=f"HOST:PORT on loopback, or unix:PATH (default {DEFAULT_LISTEN})")
    p.add_argument("--state-dir", default=DEFAULT_STATE_DIR,
                   help=f"the daemon's state directory, for its unsubscribe.key "
                        f"(default {DEFAULT_STATE_DIR})")
    p.add_argument("--key-file",
                   help="the daemon's unsubscribe.key handed in another way (systemd: "
                        "LoadCredential= and --key-file %%d/unsubscribe.key); overrides --state-dir")
    p.add_argument("--socket", default=os.environ.get("MAILERD_SOCKET") or DEFAULT_SOCKET,
                   help=f"the daemon's control socket (default $MAILERD_SOCKET, else {DEFAULT_SOCKET})")
    p.add_argument("--timeout", type=float, default=10.0,
                   help="seconds to wait for the daemon before answering 503 (default 10)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p.parse_args(argv)


def key_path(args: argparse.Namespace) -> Path:
    return Path(args.key_file) if args.key_file else Path(args.state_dir) / tokens.KEY_FILE


def load_key(path: Path) -> bytes:
    try:
        return tokens.read_key(path)
    except FileNotFoundError:
        raise StartError(f"{path} does not exist: start mailerd once (it makes the key), and "
                         f"give its state directory (--state-dir) or a copy (--key-file)") from None
    except OSError as exc:
        raise StartError(f"cannot read {path}: {exc.strerror or exc} (run as the daemon's user, "
                         f"or hand the key in with systemd's LoadCredential= and --key-file)") from None
    except ValueError as exc:
        raise StartError(str(exc)) from None


def make_site(runner: web.AppRunner, listen: str) -> web.BaseSite:
    """The listening socket: only loopback or a Unix socket; TLS is the proxy's job."""
    if listen.startswith(UNIX_PREFIX):
        return web.UnixSite(runner, listen[len(UNIX_PREFIX):])
    host, sep, port = listen.rpartition(":")
    host = host.strip("[]")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise StartError(f"--listen {listen!r}: use HOST:PORT or unix:PATH")
    if host != "localhost":
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise StartError(f"--listen {listen!r}: {host!r} is not a loopback address; the "
                             "endpoint speaks plain HTTP for a reverse proxy on this host")
    return web.TCPSite(runner, host, int(port))


async def serve(args: argparse.Namespace, key: bytes) -> None:
    runner = web.AppRunner(make_app(key, Suppressor(args.socket, args.timeout)),
                           access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = make_site(runner, args.listen)
        try:
            await site.start()
        except OSError as exc:
            raise StartError(f"cannot listen on {args.listen}: {exc.strerror or exc}") from None
        if args.listen.startswith(UNIX_PREFIX):
            # the proxy runs as another user; the socket offers no more than a loopback port would
            os.chmod(args.listen[len(UNIX_PREFIX):], 0o666)
        url = ", ".join(_url(address) for address in runner.addresses)
        event("unsubscribe_listening", url=url, daemon_socket=args.socket)
        notify.ready(f"listening on {url}")
        await _until_stopped()
        notify.stopping("stopping")
        event("unsubscribe_stopping")
    finally:
        await runner.cleanup()


def _url(address: object) -> str:
    if isinstance(address, tuple):
        host, port = address[0], address[1]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    return f"{UNIX_PREFIX}{address}"


async def _until_stopped() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging(args.log_level)
    code = 0
    try:
        asyncio.run(serve(args, load_key(key_path(args))))
    except StartError as exc:
        event("unsubscribe_start_failed", level=logging.ERROR, error=str(exc))
        print(f"mailerd-unsubscribe: {exc}", file=sys.stderr)
        code = EXIT_START
    finally:
        stop_logging()
    sys.exit(code)
