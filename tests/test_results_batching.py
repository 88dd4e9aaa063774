"""The supervisor writes the DotRequests of one turn of its event loop as one journal op
(supervisor/results.py). On a real journal, real committer thread and real socketpairs
to the slots: a recipient that may not be sent any more is refused its "." alone; the
others of the same op get theirs, and only once `data-sent` is on disk."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import msgspec

from mailerd import wire
from mailerd.journal.committer import Committer
from mailerd.journal.outbox import Outbox
from mailerd.journal.store import Journal
from mailerd.schema.config import Config
from mailerd.schema.control import CampaignSpec
from mailerd.schema.records import NewRecipient, Outcome
from mailerd.schema.workers import AnyToWorker, DotAck, DotRequest, Job
from mailerd.supervisor.dispatch import Dispatch
from mailerd.supervisor.results import Results
from mailerd.supervisor.servers import WorkerSlot
from mailerd.supervisor.tasks import Tasks

SPEC = CampaignSpec(name="t", sender="news@example.org", subject="s", text="t", columns=["email"])


def add_campaign(journal: Journal, count: int) -> int:
    campaign = journal.begin_campaign("uid-batching", SPEC)
    journal.add_recipients(campaign, [
        NewRecipient(line, f"user{line}@example.com", f"user{line}@example.com", b"\x90",
                     "queued", None) for line in range(1, count + 1)])
    journal.commit_campaign(campaign)
    return campaign


async def linked_slot(number: int) -> tuple[WorkerSlot, asyncio.StreamReader, list[object]]:
    """A slot whose writer is one end of a real socketpair; the reader is the worker's end
    (the streams are kept: a writer collected closes its socket)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    our_reader, writer = await asyncio.open_unix_connection(sock=ours)
    reader, their_writer = await asyncio.open_unix_connection(sock=theirs)
    slot = WorkerSlot("isp", number)
    slot.writer = writer
    return slot, reader, [our_reader, their_writer, ours, theirs]


async def dot_ack(reader: asyncio.StreamReader) -> DotAck:
    message = wire.Decoder(AnyToWorker).decode(await asyncio.wait_for(wire.read_frame(reader), 10))
    assert isinstance(message, DotAck)
    return message


def states(journal: Journal, campaign: int) -> dict[int, str]:
    return {r.line: r.state for r in journal.recipients(campaign, None, None)}


def test_one_unsendable_recipient_in_a_batch_is_refused_alone(tmp_path: Path) -> None:
    async def scenario() -> None:
        journal = Journal(tmp_path / "journal.sqlite3", "full")
        journal.open()
        committer = Committer(journal)
        committer.start()
        try:
            campaign = add_campaign(journal, 3)
            journal.mark_sending([(campaign, line, "isp") for line in (1, 2, 3)])
            journal.record_outcomes([Outcome(campaign, 2, "failed", 550, "settled meanwhile")])
            tasks = Tasks()
            outbox = Outbox(committer, journal.probe_write, lambda: None)
            dispatch = Dispatch({}, journal, committer, outbox, tasks, lambda: False)
            results = Results({}, dispatch, journal, committer, outbox, tasks, Config)
            slots = [await linked_slot(n) for n in range(3)]
            for (slot, _, _), line in zip(slots, (1, 2, 3)):
                results.handle(slot, DotRequest(campaign, line))  # all in this one turn
            acks = [await dot_ack(reader) for _, reader, _ in slots]
            assert [(a.line, a.ok) for a in acks] == [(1, True), (2, False), (3, True)]
            assert states(journal, campaign) == {1: "data-sent", 2: "failed", 3: "data-sent"}
            assert all(not slot.acks_owed for slot, _, _ in slots)
            for slot, _, kept in slots:
                assert slot.writer is not None
                slot.writer.close()
                kept[1].close()  # type: ignore[attr-defined]
        finally:
            await committer.stop()
            journal.close()

    asyncio.run(scenario())


def test_a_job_for_a_worker_awaiting_its_dot_ack_leaves_in_the_ack_s_write(tmp_path: Path) -> None:
    """What the supervisor sends a worker that waits for a DotAck (the next Job, mostly)
    goes with that DotAck: one write, both frames, in the order they were made."""
    async def scenario() -> None:
        journal = Journal(tmp_path / "journal.sqlite3", "full")
        journal.open()
        committer = Committer(journal)
        committer.start()
        try:
            campaign = add_campaign(journal, 2)
            journal.mark_sending([(campaign, line, "isp") for line in (1, 2)])
            tasks = Tasks()
            outbox = Outbox(committer, journal.probe_write, lambda: None)
            dispatch = Dispatch({}, journal, committer, outbox, tasks, lambda: False)
            results = Results({}, dispatch, journal, committer, outbox, tasks, Config)
            slot, reader, kept = await linked_slot(0)
            results.handle(slot, DotRequest(campaign, 1))
            slot.send(Job(campaign, 2, "user2@example.com", msgspec.Raw(b"\x90")))
            received = await asyncio.wait_for(reader.read(65536), 10)  # one write, one read
            frames, offset = [], 0
            while offset < len(received):
                (length,) = wire.HEADER.unpack_from(received, offset)
                body = received[offset + wire.HEADER.size:offset + wire.HEADER.size + length]
                frames.append(wire.Decoder(AnyToWorker).decode(body))
                offset += wire.HEADER.size + length
            assert [type(f).__name__ for f in frames] == ["Job", "DotAck"]
            assert (frames[1].line, frames[1].ok) == (1, True)
            assert states(journal, campaign) == {1: "data-sent", 2: "sending"}
            slot.send(Job(campaign, 3, "user3@example.com", msgspec.Raw(b"\x90")))  # none owed
            alone = await asyncio.wait_for(wire.read_frame(reader), 10)
            assert isinstance(wire.Decoder(AnyToWorker).decode(alone), Job)
            assert slot.writer is not None
            slot.writer.close()
            kept[1].close()  # type: ignore[attr-defined]
        finally:
            await committer.stop()
            journal.close()

    asyncio.run(scenario())
