"""Reference clients, run as their own process so their CPU is theirs alone.

    python -m bench.clients prebuilt --port P --sessions C --count N [--uvloop]
    python -m bench.clients naive    --port P --sessions C --count N

`prebuilt`: C aiosmtplib sessions in one process send one message built once,
over and over (the Python transport ceiling); with `--sessions 1 --wait-go`, one of
the C processes of scenario 1's `ceiling` (mailerd's shape: a process per session). `naive`: the loop a user would
write: per recipient, render the templates and build an EmailMessage, then send
it, C sessions in one process. Both print one JSON line: wall and CPU seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from email.message import EmailMessage
from typing import Awaitable, Callable, Iterator

import aiosmtplib
import jinja2

from . import data

SENDER_ADDRESS = "news@example.org"


def build_message(templates: dict[str, jinja2.Template], i: int) -> EmailMessage:
    context = data.render_context(i)
    message = EmailMessage()
    message["From"] = data.SENDER
    message["To"] = context["email"]
    message["Subject"] = templates["subject"].render(context)
    message.set_content(templates["text"].render(context))
    message.add_alternative(templates["html"].render(context), subtype="html")
    return message


def compile_templates() -> dict[str, jinja2.Template]:
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    sources = {"subject": data.SUBJECT, "text": data.TEXT, "html": data.HTML}
    return {name: env.from_string(source) for name, source in sources.items()}


Loop = dict[str, float]  # start, end (epoch seconds) and cpu seconds of the sending loop


async def run_sessions(port: int, sessions: int, count: int,
                       send: Callable[[aiosmtplib.SMTP, int], Awaitable[object]],
                       wait_go: bool = False) -> Loop:
    """Connect the sessions, (with `wait_go`: say `ready` and wait for a line on
    stdin, so several processes start sending together), then send `count` messages."""
    numbers: Iterator[int] = iter(range(count))

    async def connect() -> aiosmtplib.SMTP:
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=60,
                               local_hostname="bench.example.org", start_tls=False)
        await smtp.connect()
        return smtp

    async def session(smtp: aiosmtplib.SMTP) -> None:
        for i in numbers:
            await send(smtp, i)
        await smtp.quit()

    clients = await asyncio.gather(*(connect() for _ in range(sessions)))
    if wait_go:
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    cpu, start = _cpu(), time.time()
    await asyncio.gather(*(session(smtp) for smtp in clients))
    return {"start": start, "end": time.time(), "cpu": _cpu() - cpu}


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def prebuilt(port: int, sessions: int, count: int, wait_go: bool = False) -> Loop:
    templates = compile_templates()
    message = build_message(templates, 0).as_bytes()

    async def send(smtp: aiosmtplib.SMTP, i: int) -> object:
        return await smtp.sendmail(SENDER_ADDRESS, [f"user{i}@example.com"], message)

    return await run_sessions(port, sessions, count, send, wait_go)


async def naive(port: int, sessions: int, count: int, wait_go: bool = False) -> Loop:
    templates = compile_templates()

    async def send(smtp: aiosmtplib.SMTP, i: int) -> object:
        return await smtp.send_message(build_message(templates, i))

    return await run_sessions(port, sessions, count, send, wait_go)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.clients")
    parser.add_argument("kind", choices=("prebuilt", "naive"))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--sessions", type=int, required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--uvloop", action="store_true")
    parser.add_argument("--wait-go", action="store_true",
                        help="connect, print `ready`, start sending at a line on stdin")
    args = parser.parse_args()
    coroutine = {"prebuilt": prebuilt, "naive": naive}[args.kind]
    if args.uvloop:
        import uvloop
        runner = uvloop.run
    else:
        runner = asyncio.run
    started = time.perf_counter()
    loop = runner(coroutine(args.port, args.sessions, args.count, args.wait_go))
    wall = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"wall": wall, "cpu": usage.ru_utime + usage.ru_stime,
                      "count": args.count, "loop": loop}))


if __name__ == "__main__":
    main()
