"""Length-prefixed msgpack frames: the one wire format of mailerd.

Used on the control socket (mailerctl <-> daemon) and on the socketpairs between
the supervisor and its workers. A frame is a 4-byte big-endian length followed
by that many bytes of msgpack. Frames larger than the reader's limit are refused
before their body is read, so a hostile peer cannot make us buffer gigabytes.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import Any, Generic, TypeVar

import msgspec

HEADER = struct.Struct(">I")
MAX_FRAME = 8 * 1024 * 1024

T = TypeVar("T")


class FrameError(Exception):
    """The peer sent something that is not a valid frame."""


class FrameTooLarge(FrameError):
    """A message that would make a frame over the limit: refused before anything is sent."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"frame of {size} bytes exceeds the limit of {limit}")
        self.size = size
        self.limit = limit


class ConnectionClosed(Exception):
    """The peer closed the connection at a frame boundary."""


def _enc_hook(obj: Any) -> Any:
    if isinstance(obj, float):  # float subclasses such as config.Duration
        return float(obj)
    raise NotImplementedError(f"cannot encode {type(obj).__name__}")


def _dec_hook(type_: type, obj: Any) -> Any:
    if isinstance(type_, type) and issubclass(type_, float) and isinstance(obj, (int, float)):
        return type_(obj)
    raise NotImplementedError


_encoder = msgspec.msgpack.Encoder(enc_hook=_enc_hook)


def pack(message: Any) -> bytes:
    body = _encoder.encode(message)
    return HEADER.pack(len(body)) + body


def pack_within(message: Any, limit: int = MAX_FRAME) -> bytes:
    """pack(), refusing (FrameTooLarge) a message the reader would refuse anyway."""
    frame = pack(message)
    _check_length(len(frame) - HEADER.size, limit)
    return frame


def _check_length(length: int, limit: int) -> None:
    if length > limit:
        raise FrameTooLarge(length, limit)


async def read_frame(reader: asyncio.StreamReader, limit: int = MAX_FRAME) -> bytes:
    return await read_body(reader, await read_length(reader, limit))


async def read_length(reader: asyncio.StreamReader, limit: int = MAX_FRAME) -> int:
    """A frame's header: the length of the body that follows (see read_body)."""
    try:
        header = await reader.readexactly(HEADER.size)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise FrameError("truncated frame header") from None
        raise ConnectionClosed() from None
    (length,) = HEADER.unpack(header)
    _check_length(length, limit)
    return length


async def read_body(reader: asyncio.StreamReader, length: int) -> bytes:
    try:
        return await reader.readexactly(length)
    except asyncio.IncompleteReadError:
        raise FrameError(f"truncated frame: expected {length} bytes") from None


class FrameReader:
    """Every whole frame that has arrived, per wake-up: one read for all of them, where
    read_frame costs two awaits per frame. Same limit and errors as read_frame."""

    CHUNK = 256 * 1024

    def __init__(self, reader: asyncio.StreamReader, limit: int = MAX_FRAME) -> None:
        self.reader = reader
        self.limit = limit
        self._pending = bytearray()

    async def read(self) -> list[bytes]:
        """One or more frame bodies, in order; ConnectionClosed at EOF on a frame boundary.
        The frames before one that is refused (too large) are returned first."""
        while True:
            frames, used = self._split(self._pending)
            if frames:
                del self._pending[:used]
                return frames
            chunk = await self.reader.read(self.CHUNK)
            if not chunk:
                if self._pending:
                    raise FrameError("truncated frame")
                raise ConnectionClosed()
            self._pending += chunk

    def _split(self, data: bytearray) -> tuple[list[bytes], int]:
        frames: list[bytes] = []
        offset, end = 0, len(data)
        while end - offset >= HEADER.size:
            (length,) = HEADER.unpack_from(data, offset)
            if length > self.limit and frames:
                break  # refused at the next read, after these
            _check_length(length, self.limit)
            start = offset + HEADER.size
            if end - start < length:
                break
            frames.append(bytes(data[start:start + length]))
            offset = start + length
        return frames, offset


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < size:
        chunk = sock.recv(size - len(chunks))
        if not chunk:
            if chunks:
                raise FrameError("truncated frame")
            raise ConnectionClosed()
        chunks += chunk
    return bytes(chunks)


def recv_frame(sock: socket.socket, limit: int = MAX_FRAME) -> bytes:
    """Blocking read of one frame (used by mailerctl)."""
    (length,) = HEADER.unpack(_recv_exactly(sock, HEADER.size))
    _check_length(length, limit)
    try:
        return _recv_exactly(sock, length)  # b"" for an empty frame: nothing is read
    except ConnectionClosed:
        raise FrameError(f"truncated frame: expected {length} bytes") from None


class Decoder(Generic[T]):
    """A typed msgpack decoder whose errors become FrameError."""

    def __init__(self, type_: type[T]) -> None:
        self._decoder = msgspec.msgpack.Decoder(type_, dec_hook=_dec_hook)

    def decode(self, body: bytes) -> T:
        try:
            return self._decoder.decode(body)
        except msgspec.DecodeError as exc:
            raise FrameError(f"undecodable frame: {exc}") from None
        except RecursionError:  # msgspec's depth guard on deeply nested arrays or maps
            raise FrameError("undecodable frame: nested too deeply") from None
        except ValueError as exc:
            raise FrameError(f"undecodable frame: {exc}") from None
