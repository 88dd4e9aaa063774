"""Reference clients, run as their own process so their CPU is theirs alone.

    python -m bench.clients prebuilt --port P --sessions C --count N [--uvloop]
    python -m bench.clients naive    --port P --sessions C --count N

`prebuilt`: C aiosmtplib sessions in one process send one message built once,
over and over (the Python transport ceiling). `naive`: the loop a user would
write: per recipient, render the templates and build an EmailMessage, then send
it, C sessions in one process. Both print one JSON line: wall and CPU seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
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


async def run_sessions(port: int, sessions: int, count: int,
                       send: Callable[[aiosmtplib.SMTP, int], Awaitable[object]]) -> None:
    numbers: Iterator[int] = iter(range(count))

    async def session() -> None:
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=60,
                               local_hostname="bench.example.org", start_tls=False)
        await smtp.connect()
        for i in numbers:
            await send(smtp, i)
        await smtp.quit()

    await asyncio.gather(*(session() for _ in range(sessions)))


async def prebuilt(port: int, sessions: int, count: int) -> None:
    templates = compile_templates()
    message = build_message(templates, 0).as_bytes()

    async def send(smtp: aiosmtplib.SMTP, i: int) -> object:
        return await smtp.sendmail(SENDER_ADDRESS, [f"user{i}@example.com"], message)

    await run_sessions(port, sessions, count, send)


async def naive(port: int, sessions: int, count: int) -> None:
    templates = compile_templates()

    async def send(smtp: aiosmtplib.SMTP, i: int) -> object:
        return await smtp.send_message(build_message(templates, i))

    await run_sessions(port, sessions, count, send)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.clients")
    parser.add_argument("kind", choices=("prebuilt", "naive"))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--sessions", type=int, required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--uvloop", action="store_true")
    args = parser.parse_args()
    coroutine = {"prebuilt": prebuilt, "naive": naive}[args.kind]
    if args.uvloop:
        import uvloop
        runner = uvloop.run
    else:
        runner = asyncio.run
    started = time.perf_counter()
    runner(coroutine(args.port, args.sessions, args.count))
    wall = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"wall": wall, "cpu": usage.ru_utime + usage.ru_stime,
                      "count": args.count}))


if __name__ == "__main__":
    main()
