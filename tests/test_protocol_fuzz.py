"""Property-based fuzzing of what crosses a trust boundary: frames and lists."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailerctl.campaign import InputError, RecipientList
from mailerd import wire
from mailerd.control.enqueue import store_chunk
from mailerd.journal.store import Journal
from mailerd.schema.control import AnyRequest, CampaignSpec, Request, Row, RowsAccepted, Settle

FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])

msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=20,
)
request_like = st.fixed_dictionaries(
    {"op": st.sampled_from(["Status", "Report", "EnqueueRows", "Resume", "Pause", "Settle",
                            "SetPacing", "Nope"])},
    optional={"v": st.integers(-2, 3), "campaign": msgpack_values, "rows": msgpack_values,
              "settings": msgpack_values, "emails": msgpack_values},
)


def decode_or_frame_error(body: bytes) -> None:
    try:
        decoded = wire.Decoder(AnyRequest).decode(body)
    except wire.FrameError as exc:
        assert str(exc).startswith("undecodable frame")
    else:
        assert isinstance(decoded, Request)


@FUZZ
@given(st.binary(max_size=512))
def test_random_bytes_decode_or_give_a_frame_error(body):
    decode_or_frame_error(body)


@FUZZ
@given(request_like)
def test_request_shaped_maps_decode_or_give_a_frame_error(value):
    decode_or_frame_error(msgspec.msgpack.encode(value))


@FUZZ
@given(st.binary(max_size=64))
def test_stream_reader_never_buffers_past_the_limit(data):
    async def read_all() -> None:
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        while True:
            try:
                frame = await wire.read_frame(reader, limit=32)
            except (wire.ConnectionClosed, wire.FrameError):
                return
            assert len(frame) <= 32

    asyncio.run(read_all())


async def read_frames(data: bytes, chunk: int, limit: int) -> tuple[list[bytes], Exception]:
    """wire.FrameReader over a real socketpair carrying `data`, `chunk` bytes a read."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(data)
        theirs.shutdown(socket.SHUT_WR)
        stream, writer = await asyncio.open_unix_connection(sock=ours)
        frames = wire.FrameReader(stream, limit=limit)
        frames.CHUNK = chunk
        got: list[bytes] = []
        try:
            while True:
                got += await frames.read()
        except (wire.ConnectionClosed, wire.FrameError) as exc:
            writer.close()
            return got, exc


@FUZZ
@given(st.lists(st.binary(max_size=40), min_size=1, max_size=8), st.integers(1, 50),
       st.binary(max_size=wire.HEADER.size - 1))
def test_frames_read_in_batches_come_out_whole_and_in_order(bodies, chunk, cut_header):
    """How the supervisor and its workers read each other: every frame as sent, in order,
    then ConnectionClosed at a frame boundary, or FrameError after a cut-off header."""
    data = b"".join(wire.pack(body) for body in bodies) + cut_header
    got, ended = asyncio.run(read_frames(data, chunk, limit=64))
    assert got == [msgspec.msgpack.encode(body) for body in bodies]
    assert type(ended) is (wire.FrameError if cut_header else wire.ConnectionClosed)


def test_batched_frame_reads_refuse_a_frame_over_the_limit_before_its_body():
    data = wire.pack(b"ok") + wire.HEADER.pack(65) + b"x" * 65
    got, ended = asyncio.run(read_frames(data, 1024, limit=64))
    assert got == [msgspec.msgpack.encode(b"ok")] and isinstance(ended, wire.FrameTooLarge)


csv_text = st.text(
    alphabet=st.sampled_from(list('ab@.,;\t"\r\n é\x00\ufeff')), max_size=300)


@FUZZ
@given(csv_text)
def test_list_importer_reads_or_names_the_problem(tmp_path_factory, text):
    path = Path(tmp_path_factory.mktemp("csv")) / "list.csv"
    path.write_text("email,name\n" + text, encoding="utf-8")
    try:
        recipients = RecipientList(path)
    except InputError as exc:
        assert str(path) in str(exc)
        return
    try:
        lines = [row.line for row in recipients.rows()]
    except InputError as exc:
        assert str(path) in str(exc) and "line" in str(exc)
        return
    finally:
        recipients.close()
    assert lines == sorted(lines) and all(line >= 2 for line in lines)


@FUZZ
@given(st.binary(max_size=200))
def test_list_importer_rejects_non_utf8_clearly(tmp_path_factory, data):
    path = Path(tmp_path_factory.mktemp("csv")) / "list.csv"
    path.write_bytes(b"email\n" + data)
    try:  # the importer reads UTF-8 with or without a BOM
        (b"email\n" + data).decode("utf-8-sig")
        valid = True
    except UnicodeDecodeError:
        valid = False
    try:
        recipients = RecipientList(path)
        try:
            list(recipients.rows())
        finally:
            recipients.close()
    except InputError as exc:
        assert str(path) in str(exc)
        assert valid or "not UTF-8" in str(exc), str(exc)
    else:
        assert valid, "a list that is not UTF-8 was read without an error"


row_values = st.lists(st.text(max_size=40), min_size=0, max_size=4)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(row_values, max_size=30))
def test_daemon_side_row_check_stores_every_row_as_queued_or_invalid(tmp_path_factory, rows):
    journal = Journal(Path(tmp_path_factory.mktemp("j")) / "journal.sqlite3")
    journal.open()
    try:
        spec = CampaignSpec(name="f", sender="a@example.org", subject="s", text="t",
                            columns=["email", "name", "code"])
        campaign = journal.begin_campaign("u", spec)
        framed = [Row(line + 2, values) for line, values in enumerate(rows)]
        result = store_chunk(journal, campaign, spec.columns, framed)
        assert isinstance(result, RowsAccepted) and result.rows == len(rows)
        counts = journal.counts(campaign)
        assert counts.queued + counts.invalid == len(rows)
        for info in journal.recipients(campaign, "invalid", None):
            assert info.reply  # every rejection says why
    finally:
        journal.close()


def test_deeply_nested_frames_are_frame_errors_not_recursion_errors():
    for body in (b"\x81\xa1a" * 1_000_000 + b"\xc0",  # 1M nested maps (security review L8)
                 b"\x91" * 1_000_000 + b"\xc0"):      # 1M nested arrays
        decode_or_frame_error(body)


def test_a_frame_over_the_limit_is_refused_before_it_is_sent():
    request = Settle(campaign=1, as_sent=True, emails=["x" * 100] * 1000)
    assert len(wire.pack_within(request, limit=200_000)) > 100_000
    try:
        wire.pack_within(request, limit=50_000)
    except wire.FrameTooLarge as exc:
        assert exc.limit == 50_000 and exc.size > 100_000
    else:
        raise AssertionError("an oversized frame was packed")
