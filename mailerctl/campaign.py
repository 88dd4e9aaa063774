"""Reading a campaign file and its recipient list on the client side.

mailerctl opens the files; the daemon never opens a path a client names. The
list is read as a stream of Rows so a million-line file never sits in memory.
"""

from __future__ import annotations

import csv
import io
import os
import tomllib
from pathlib import Path
from typing import Iterator

import msgspec

from mailerd.schema.control import (
    AttachmentInfo,
    CampaignBase,
    CampaignSpec,
    DkimBase,
    DkimKey,
    Row,
    email_column_index,
)
from mailerd.message.render import content_type_for
from mailerd.message.signing import DkimKeyError, Signer


class InputError(Exception):
    """A campaign or list file is unusable; the message names the file and the problem."""


class DkimFile(DkimBase, forbid_unknown_fields=True):
    key_file: str  # relative to the campaign file


class CampaignFile(CampaignBase, forbid_unknown_fields=True):
    """A campaign file; text, html, attachments and dkim.key_file are paths relative to it."""

    attachments: list[str] = []
    dkim: DkimFile | None = None


def read_toml(path: Path, what: str) -> dict:
    """A TOML file's table; InputError naming the file when it cannot be read or parsed."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InputError(f"{path}: cannot read {what}: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: invalid TOML: {exc}") from None


def load_campaign(path: str | Path, columns: list[str]) -> CampaignSpec:
    return load_campaign_files(path, columns)[0]


def load_campaign_files(path: str | Path, columns: list[str]) -> tuple[CampaignSpec, list[Path]]:
    """The spec (bodies and DKIM key read in) and the attachments' paths, checked readable."""
    path = Path(path)
    raw = read_toml(path, "campaign file")
    try:
        campaign = msgspec.convert(raw, CampaignFile)
    except msgspec.ValidationError as exc:
        raise InputError(f"{path}: {_describe(exc)}") from None
    files = [_attachment(path, i, relative) for i, relative in enumerate(campaign.attachments)]
    shared = {name: getattr(campaign, name) for name in CampaignBase.__struct_fields__}
    bodies = {"text": _read_body(path, "text", campaign.text),
              "html": _read_body(path, "html", campaign.html)}
    spec = CampaignSpec(
        **(shared | bodies),
        columns=columns,
        dkim=_read_dkim(path, campaign.dkim),
        attachments=[info for info, _ in files],
    )
    return spec, [file for _, file in files]


def _attachment(campaign_path: Path, index: int, relative: str) -> tuple[AttachmentInfo, Path]:
    path = campaign_path.parent / relative
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            handle.read(1)
    except OSError as exc:
        raise InputError(f"{campaign_path}: attachments[{index}] = {relative!r}: cannot read "
                         f"{path}: {exc.strerror}") from None
    if not path.is_file():
        raise InputError(f"{campaign_path}: attachments[{index}] = {relative!r}: {path} is not a file")
    info = AttachmentInfo(name=path.name, content_type=content_type_for(path.name), size=size)
    return info, path


def _read_dkim(campaign_path: Path, dkim: DkimFile | None) -> DkimKey | None:
    if dkim is None:
        return None
    path = campaign_path.parent / dkim.key_file
    try:
        text = path.read_text(encoding="ascii")
    except OSError as exc:
        raise InputError(f"{campaign_path}: dkim.key_file = {dkim.key_file!r}: cannot read {path}: "
                         f"{exc.strerror}") from None
    except UnicodeDecodeError:
        raise InputError(f"{campaign_path}: dkim.key_file = {dkim.key_file!r}: {path} is not a "
                         "text key file") from None
    try:
        Signer(dkim.domain, dkim.selector, text)
    except DkimKeyError as exc:
        raise InputError(f"{campaign_path}: dkim: {exc}") from None
    return DkimKey(domain=dkim.domain, selector=dkim.selector, key=text)


ATTACHMENT_CHUNK = 4 * 1024 * 1024  # bytes per EnqueueAttachment frame (< wire.MAX_FRAME)


def attachment_chunks(path: Path) -> Iterator[tuple[bytes, bool]]:
    """(chunk, last) pieces of an attachment file, read as they are sent."""
    try:
        with open(path, "rb") as handle:
            chunk = handle.read(ATTACHMENT_CHUNK)
            while True:
                following = handle.read(ATTACHMENT_CHUNK)
                yield chunk, not following
                if not following:
                    return
                chunk = following
    except OSError as exc:
        raise InputError(f"{path}: cannot read attachment: {exc.strerror}") from None


def _describe(exc: msgspec.ValidationError) -> str:
    text, _, where = str(exc).rpartition(" - at `$.")
    if not _:
        return str(exc)
    return f"key {where.rstrip('`')}: {text}"


def _read_body(campaign_path: Path, key: str, relative: str | None) -> str | None:
    if relative is None:
        return None
    path = campaign_path.parent / relative
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(f"{campaign_path}: {key} = {relative!r}: cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise InputError(f"{campaign_path}: {key} = {relative!r}: {path} is not UTF-8 ({exc.reason} at byte {exc.start})") from None


MAX_COLUMNS = 10_000  # an address and its merge fields; more is a mistaken file (review L7)
MAX_HEADER_CHARS = 1024 * 1024


class RecipientList:
    """A CSV list: header row first; delimiter , ; or tab; UTF-8 with or without BOM."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self._file = open(self.path, encoding="utf-8-sig", newline="")
        except OSError as exc:
            raise InputError(f"{self.path}: cannot read recipient list: {exc.strerror}") from None
        self.size = self.path.stat().st_size
        first = self._read_guarded(lambda: self._file.readline(MAX_HEADER_CHARS + 1))
        if len(first) > MAX_HEADER_CHARS:  # read no further: a list this wide is a mistake
            raise InputError(f"{self.path}: line 1: the header row is longer than "
                             f"{MAX_HEADER_CHARS:,} characters (at most {MAX_COLUMNS:,} columns)")
        if not first.strip():
            raise InputError(f"{self.path}: line 1: the list is empty (a header row with an 'email' column is expected)")
        self.delimiter = max(",;\t", key=first.count)
        self._reader = csv.reader(
            _prepend(first, self._file), delimiter=self.delimiter, strict=False
        )
        self.columns = [c.strip() for c in self._read_guarded(lambda: next(self._reader))]
        if len(self.columns) > MAX_COLUMNS:
            raise InputError(f"{self.path}: line 1: {len(self.columns):,} columns; a list has at "
                             f"most {MAX_COLUMNS:,} (the email and the merge fields)")
        if email_column_index(self.columns) is None:
            raise InputError(f"{self.path}: line 1: no 'email' column in the header ({', '.join(self.columns)})")

    def _read_guarded(self, read):
        try:
            return read()
        except UnicodeDecodeError as exc:
            raise InputError(f"{self.path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        except csv.Error as exc:
            raise InputError(f"{self.path}: line {self._reader.line_num}: {exc}") from None

    def rows(self) -> Iterator[Row]:
        reader = self._reader
        while True:
            start = reader.line_num + 1
            values = self._read_guarded(lambda: next(reader, None))
            if values is None:
                return
            if not values or values == [""]:
                continue  # blank line
            yield Row(start, values)

    def position(self) -> int:
        try:
            return self._file.buffer.tell()
        except (OSError, ValueError):
            return 0

    def close(self) -> None:
        self._file.close()


def _prepend(first: str, rest: io.TextIOBase) -> Iterator[str]:
    yield first
    yield from rest
