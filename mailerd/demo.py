"""`python -m mailerd.demo`: see mailerd work against a relay that drops connections.

Starts a small relay on 127.0.0.1 that closes the session after every 7 messages,
runs mailerd on ./demo-run with nothing but that relay configured, enqueues a
1,000-recipient campaign with mailerctl, watches it to the end, prints the report
and what the relay received, and stops everything.

The relay here needs nothing but the standard library: the demo runs wherever
mailerd is installed, without the test extra (aiosmtpd). The tests' relay with its
many faults is mailerd/testing/relay.py.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from types import TracebackType

from mailerd.testing.daemon import DaemonExited, DaemonProcess

CAMPAIGN = """\
name = "Demo letter"
from = "Demo News <news@example.org>"
subject = "Hello {{ first_name }}, your November letter"
text = "body.txt"
html = "body.html"
"""
TEXT = "Dear {{ first_name }} {{ last_name }},\n\nthis is the November letter.\n"
HTML = "<p>Dear <b>{{ first_name }}</b> {{ last_name }},</p>\n<p>this is the November letter.</p>\n"


class DemoRelay:
    """Just enough SMTP for the demo: takes every message, counts each recipient at
    the final ".", and closes the session right after the 250 for every
    `drop_after`-th message of a session, as a relay with a per-session limit does."""

    def __init__(self, drop_after: int) -> None:
        self.drop_after = drop_after
        self.received: collections.Counter[str] = collections.Counter()
        self.drops = 0
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve, name="demo-relay", daemon=True)
        self._ready = threading.Event()

    def __enter__(self) -> "DemoRelay":
        self._thread.start()
        if not self._ready.wait(10):
            raise SystemExit("the demo relay did not start")
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(
            asyncio.start_server(self._session, "127.0.0.1", 0, limit=MAX_MESSAGE))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        server.close()
        sessions = asyncio.all_tasks(self._loop)
        for task in sessions:
            task.cancel()
        self._loop.run_until_complete(asyncio.gather(*sessions, return_exceptions=True))
        self._loop.close()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted = 0
        recipients: list[str] = []
        try:
            writer.write(b"220 demo relay ESMTP\r\n")
            while line := await reader.readline():
                verb = line[:4].upper()
                if verb == b"QUIT":
                    writer.write(b"221 bye\r\n")
                    break
                if verb == b"DATA":
                    writer.write(b"354 go ahead\r\n")
                    await reader.readuntil(b"\r\n.\r\n")
                    self.received.update(recipients)
                    accepted += 1
                    writer.write(b"250 ok: queued\r\n")
                    if accepted % self.drop_after == 0:
                        self.drops += 1
                        break
                elif verb == b"RCPT":
                    recipients += _ADDRESS.findall(line.decode("utf-8", "replace"))[:1]
                    writer.write(b"250 ok\r\n")
                else:
                    if verb == b"MAIL":
                        recipients = []
                    writer.write(_REPLIES.get(verb, b"502 not implemented\r\n"))
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


MAX_MESSAGE = 16 * 1024 * 1024
_ADDRESS = re.compile(r"<([^>]*)>")
_REPLIES = {b"EHLO": b"250-demo relay\r\n250 8BITMIME\r\n", b"HELO": b"250 demo relay\r\n",
            b"MAIL": b"250 ok\r\n", b"RSET": b"250 ok\r\n", b"NOOP": b"250 ok\r\n"}


def write_files(run_dir: Path, count: int) -> tuple[Path, Path]:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "body.txt").write_text(TEXT)
    (run_dir / "body.html").write_text(HTML)
    campaign = run_dir / "campaign.toml"
    campaign.write_text(CAMPAIGN)
    recipients = run_dir / "list.csv"
    with recipients.open("w") as out:
        out.write("email,first_name,last_name\n")
        for i in range(count):
            out.write(f"reader{i}@example.com,Reader{i},Demo\n")
    return campaign, recipients


def mailerctl(socket: Path, *args: str, capture: bool = False) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "mailerctl", "--socket", str(socket), *args],
        check=True, text=True, stdout=subprocess.PIPE if capture else None,
    )
    return result.stdout or ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipients", type=int, default=1000)
    parser.add_argument("--drop-after", type=int, default=7)
    parser.add_argument("--dir", default="demo-run")
    args = parser.parse_args()
    run_dir = Path(args.dir).resolve()
    shutil.rmtree(run_dir / "state", ignore_errors=True)  # each run starts from an empty journal
    (run_dir / "mailerd.log").unlink(missing_ok=True)

    with DemoRelay(args.drop_after) as relay:
        campaign, recipients = write_files(run_dir, args.recipients)
        print(f"demo relay on 127.0.0.1:{relay.port}, dropping the session every "
              f"{args.drop_after} messages")
        daemon = DaemonProcess(run_dir, {"servers.local": {
            "host": "127.0.0.1", "port": relay.port, "connections": 4}})
        try:
            daemon.start()
            socket = Path(daemon.socket)
            campaign_id = mailerctl(socket, "enqueue", str(campaign), "--recipients",
                                    str(recipients), capture=True).strip()
            print(f"enqueued campaign {campaign_id} ({args.recipients} recipients)")
            mailerctl(socket, "watch", campaign_id)
            mailerctl(socket, "report", campaign_id)
        except (DaemonExited, TimeoutError) as exc:
            raise SystemExit(f"mailerd did not start: {exc}") from None
        except subprocess.CalledProcessError as exc:
            raise SystemExit(f"mailerctl {' '.join(exc.cmd[5:])} failed (exit {exc.returncode}); "
                             f"see {daemon.log_path}") from None
        finally:
            daemon.terminate(30)
            daemon.cleanup()
        counts = relay.received
        twice = sum(1 for n in counts.values() if n > 1)
        print(f"\nrelay: {sum(counts.values())} messages to {len(counts)} distinct recipients, "
              f"{twice} received more than once, {relay.drops} connections dropped by the relay")
        print(f"daemon log: {daemon.log_path}")
    if twice or len(counts) != args.recipients:
        sys.exit(1)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
