"""Taking a campaign in: checking its spec and storing its list, chunk by chunk.

The client streams rows; each chunk is checked here (column count, address
syntax, duplicates within the list) and stored in one journal operation. Bad rows
are kept as `invalid` with their line and reason: a list is never refused for them.
"""

from __future__ import annotations

from email.utils import parseaddr

import msgspec

from .addresses import check_address
from .config import Config
from .journal import Journal, NewRecipient
from .protocol import CampaignSpec, Row, RowsAccepted
from .render import TemplateError, template_variables

_encode = msgspec.msgpack.encode


class SpecError(ValueError):
    """The campaign cannot be taken; the message names the field."""


def email_column(columns: list[str]) -> int:
    lowered = [c.strip().lower() for c in columns]
    if "email" not in lowered:
        raise SpecError(
            f"the recipient list has no 'email' column (columns: {', '.join(columns) or 'none'})"
        )
    return lowered.index("email")


def merge_fields(columns: list[str]) -> list[str]:
    index = email_column(columns)
    return [c for i, c in enumerate(columns) if i != index]


def check_spec(spec: CampaignSpec, config: Config) -> None:
    if not spec.name.strip():
        raise SpecError("name: must not be empty")
    _check_sender(spec.sender)
    if spec.text is None and spec.html is None:
        raise SpecError("text/html: the campaign needs a text or an html body")
    known = set(merge_fields(spec.columns)) | {"email"}
    for field, source in (("subject", spec.subject), ("text", spec.text), ("html", spec.html)):
        if source is not None:
            _check_template(field, source, known)
    for server in spec.servers or []:
        if server not in config.servers:
            raise SpecError(
                f"servers: no server named {server!r} in the daemon's config "
                f"(configured: {', '.join(config.servers) or 'none'})"
            )
    if not config.servers:
        raise SpecError("servers: the daemon has no [servers.*] configured")


def _check_sender(sender: str) -> None:
    address = parseaddr(sender)[1]
    if not address or not check_address(address).ok:
        raise SpecError(f"from: {sender!r} is not a valid sender address")
    if any(c in sender for c in "\r\n"):
        raise SpecError("from: must be a single line")


def _check_template(field: str, source: str, known: set[str]) -> None:
    try:
        names = template_variables(source)
    except TemplateError as exc:
        raise SpecError(f"{field}: {exc}") from None
    missing = sorted(names - known)
    if missing:
        raise SpecError(
            f"{field}: template uses {', '.join(repr(m) for m in missing)}, which the list "
            f"does not have (columns: {', '.join(sorted(known))})"
        )


def store_chunk(journal: Journal, campaign: int, columns: list[str], rows: list[Row]) -> RowsAccepted:
    """Check and store one chunk. Runs on the journal thread, inside one transaction."""
    index = email_column(columns)
    prepared: list[NewRecipient] = []
    first_line_of: dict[str, int] = {}
    for row in rows:
        prepared.append(_prepare(row, index, len(columns), first_line_of))
    earlier = journal.known_keys(campaign, first_line_of)
    if earlier:
        prepared = [_mark_earlier_duplicate(journal, campaign, r, earlier) for r in prepared]
    journal.add_recipients(campaign, prepared)
    invalid = sum(1 for r in prepared if r.state == "invalid")
    return RowsAccepted(rows=len(prepared), invalid=invalid)


def _prepare(row: Row, index: int, width: int, first_line_of: dict[str, int]) -> NewRecipient:
    values = row.values
    raw_email = values[index] if index < len(values) else ""
    if len(values) != width:
        return _invalid(row.line, raw_email, f"expected {width} fields, found {len(values)}")
    check = check_address(raw_email)
    if not check.ok:
        return _invalid(row.line, raw_email, check.reason)
    if check.key in first_line_of:
        return _invalid(row.line, check.address, f"duplicate of line {first_line_of[check.key]}")
    first_line_of[check.key] = row.line
    fields = _encode([v for i, v in enumerate(values) if i != index])
    return NewRecipient(row.line, check.address, check.key, fields, "queued", None)


def _mark_earlier_duplicate(
    journal: Journal, campaign: int, row: NewRecipient, earlier: set[str]
) -> NewRecipient:
    if row.key is None or row.key not in earlier:
        return row
    first = journal.line_of_key(campaign, row.key)
    return _invalid(row.line, row.email, f"duplicate of line {first}")


def _invalid(line: int, email: str, reason: str) -> NewRecipient:
    return NewRecipient(line, email, None, None, "invalid", reason)
