"""A stand-in supervisor driving one real `mailerd.worker.session` process.

It speaks the worker protocol (Setup, CampaignTemplate, Jobs two at a time) and
answers each DotRequest either at once ("instant") or only after the real
journal has committed `data-sent` through the real committer ("journal"), the
way the daemon does. The difference between the two is what committing before
the final "." costs per message. Outcomes are journaled in both modes, so the
journal thread does the same other work either way.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import sys
import time
from pathlib import Path

import msgspec

from mailerctl.campaign import load_campaign
from mailerd import wire
from mailerd.journal.committer import Committer
from mailerd.config import load_config
from mailerd.control.enqueue import store_chunk
from mailerd.journal.store import Journal
from mailerd.schema.records import Outcome
from mailerd.schema.control import Row
from mailerd.schema.workers import (
    AnyFromWorker,
    CampaignTemplate,
    Done,
    DotAck,
    DotRequest,
    Job,
    Setup,
    Stop,
)

from . import data

SERVER = "sink"
PREFETCH = 2


class FakeSupervisor:
    def __init__(self, workdir: Path, port: int, count: int, journal_sync: str) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        config_path = workdir / "mailerd.toml"
        config_path.write_text(
            f'[daemon]\njournal_sync = "{journal_sync}"\n\n'
            f'[servers.{SERVER}]\nhost = "127.0.0.1"\nport = {port}\nsecurity = "none"\n'
            'helo_name = "bench.example.org"\n'
        )
        self.config = load_config(config_path)
        self.count = count
        self.columns = ["email", *data.FIELDS]
        self.spec = load_campaign(data.write_campaign(workdir / "campaign"), self.columns)
        self.journal = Journal(workdir / "journal.sqlite3", journal_sync)
        self.journal.open()
        self.committer = Committer(self.journal)
        self.campaign = 0
        self.uid = secrets.token_hex(8)

    async def prepare(self) -> None:
        self.committer.start()
        run = self.committer.run
        self.campaign = await run(self.journal.begin_campaign, self.uid, self.spec)
        for start in range(0, self.count, 2000):
            rows = [Row(i + 2, list(data.recipient(i)))
                    for i in range(start, min(start + 2000, self.count))]
            await run(store_chunk, self.journal, self.campaign, self.columns, rows)
        await run(self.journal.commit_campaign, self.campaign)

    async def close(self) -> None:
        await self.committer.stop()
        self.journal.close()

    async def drive(self, ack: str, command_prefix: list[str] | None = None) -> dict:
        """Send every recipient through one worker; return wall seconds per message."""
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        command = [*(command_prefix or [sys.executable]), "-m", "mailerd.worker.session",
                   str(child.fileno())]
        process = await asyncio.create_subprocess_exec(
            *command, pass_fds=(child.fileno(),), stdin=asyncio.subprocess.DEVNULL)
        child.close()
        reader, writer = await asyncio.open_unix_connection(sock=parent, limit=wire.MAX_FRAME)
        send = lambda message: writer.write(wire.pack(message))
        send(Setup(server=self.config.servers[SERVER], delivery=self.config.delivery,
                   password=None))
        send(CampaignTemplate(self.campaign, self.uid, self.spec))
        lines = iter(range(2, self.count + 2))
        started = time.perf_counter()
        for _ in range(PREFETCH):
            self._hand_out(send, next(lines))
        done = await self._serve(reader, send, lines, ack)
        wall = time.perf_counter() - started
        send(Stop())
        await writer.drain()
        await process.wait()
        writer.close()
        return {"messages": done, "wall": wall, "ms_per_msg": 1000 * wall / done}

    def _hand_out(self, send, line: int) -> None:
        email, *fields = data.recipient(line - 2)
        self.committer.run(self.journal.mark_sending, [(self.campaign, line, SERVER)])
        send(Job(self.campaign, line, email, msgspec.Raw(msgspec.msgpack.encode(fields))))

    async def _serve(self, reader, send, lines, ack: str) -> int:
        decoder = wire.Decoder(AnyFromWorker)
        done = 0
        while done < self.count:
            message = decoder.decode(await wire.read_frame(reader))
            if isinstance(message, DotRequest):
                await self._acknowledge(send, message, ack)
            elif isinstance(message, Done):
                done += 1
                if message.result != "sent":
                    raise RuntimeError(f"worker reported {message.result}: {message.reply}")
                outcome = Outcome(message.campaign, message.line, "sent", message.code,
                                  message.reply)
                self.committer.run(self.journal.record_outcomes, [outcome])
                line = next(lines, None)
                if line is not None:
                    self._hand_out(send, line)
        return done

    async def _acknowledge(self, send, message: DotRequest, ack: str) -> None:
        if ack == "journal":
            await self.committer.run(self.journal.mark_data_sent,
                                     [(message.campaign, message.line, SERVER)])
        send(DotAck(message.campaign, message.line, True))
