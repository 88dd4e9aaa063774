"""Taking a campaign in: checking its spec and storing its list, chunk by chunk.

The client streams rows; each chunk is checked here (column count, address
syntax, duplicates within the list, merge values that would make an unsafe
message) and stored in one journal operation. Bad rows are kept as `invalid` with
their line and reason: a list is never refused for them, except for unsafe merge
values, which refuse the campaign unless the client asked to skip them.
"""

from __future__ import annotations

from email.utils import parseaddr

import msgspec

from mailerd.message.addresses import check_address
from mailerd.schema.config import Config
from mailerd.journal.store import Journal, suppressed_reply
from mailerd.schema.records import NewRecipient
from mailerd.schema.control import (CampaignSpec, Error, Row, RowsAccepted, email_column_index,
                                    merge_field_names)
from mailerd.message.check import SpecError, check_message_parts
from mailerd.message.render import TemplateError, template_variables
from mailerd.message.signing import domain_refusal
from mailerd.message.rowcheck import UNSAFE

BUILTIN_VARIABLES = {"email", "token", "campaign_uid", "line"}

_encode = msgspec.msgpack.encode


def email_column(columns: list[str]) -> int:
    index = email_column_index(columns)
    if index is None:
        raise SpecError(
            f"the recipient list has no 'email' column (columns: {', '.join(columns) or 'none'})"
        )
    return index


def merge_fields(columns: list[str]) -> list[str]:
    email_column(columns)  # refuses a list without one
    return merge_field_names(columns)


def check_spec(spec: CampaignSpec, config: Config) -> None:
    if not spec.name.strip():
        raise SpecError("name: must not be empty")
    _check_sender(spec.sender)
    if spec.text is None and spec.html is None:
        raise SpecError("text/html: the campaign needs a text or an html body")
    known = set(merge_fields(spec.columns)) | BUILTIN_VARIABLES
    for field, source in _templates(spec):
        if source is not None:
            _check_template(field, source, known)
    check_message_parts(spec)
    for server in spec.servers or []:
        if server not in config.servers:
            raise SpecError(
                f"servers: no server named {server!r} in the daemon's config "
                f"(configured: {', '.join(config.servers) or 'none'})"
            )
    if not config.servers:
        raise SpecError("servers: the daemon has no [servers.*] configured")
    if spec.dkim is None:  # a server's key signs only its own domains (review L10)
        for name in spec.servers or list(config.servers):
            server = config.servers[name]
            refusal = server.dkim_key_file and domain_refusal(
                spec.sender, server.dkim_domain or "", server.dkim_domains,
                f"servers.{name}.dkim_domains")
            if refusal:
                raise SpecError(refusal)


def _templates(spec: CampaignSpec) -> list[tuple[str, str | None]]:
    templates = [("subject", spec.subject), ("text", spec.text), ("html", spec.html)]
    templates += [(f"headers.{name}", value) for name, value in spec.headers.items()]
    if spec.list_unsubscribe is not None:
        templates += [("list_unsubscribe.mailto", spec.list_unsubscribe.mailto),
                      ("list_unsubscribe.url", spec.list_unsubscribe.url)]
    return templates


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


def store_chunk(journal: Journal, campaign: int, columns: list[str], rows: list[Row],
                unsafe: dict[int, str] | None = None, skip_unsafe: bool = False
                ) -> RowsAccepted | Error:
    """Check and store one chunk. Runs on the journal thread, inside one transaction.
    `unsafe` is message.rowcheck.unsafe_rows' finding: such a row refuses the chunk
    (an Error naming its line and column; nothing is stored), or with skip_unsafe is
    stored as invalid."""
    unsafe = unsafe or {}
    if unsafe and not skip_unsafe:
        line = min(unsafe)
        return Error(message=f"campaign refused: line {line}: {unsafe[line]} ({len(unsafe)} such "
                             f"row(s) in this chunk of the list); correct the list, or "
                             f"`mailerctl enqueue --skip-unsafe` keeps such rows as invalid")
    index = email_column(columns)
    prepared: list[NewRecipient] = []
    first_line_of: dict[str, int] = {}
    for row in rows:
        prepared.append(_prepare(row, index, len(columns), first_line_of, unsafe))
    earlier = journal.first_lines(campaign, first_line_of)
    if earlier:
        prepared = [_mark_earlier_duplicate(r, earlier) for r in prepared]
    if journal.has_suppressions():
        prepared = _mark_suppressed(journal, prepared)
    journal.add_recipients(campaign, prepared)
    invalid = sum(1 for r in prepared if r.state == "invalid")
    skipped = sum(1 for r in prepared if r.reply is not None and r.reply.startswith(UNSAFE))
    return RowsAccepted(rows=len(prepared), invalid=invalid, unsafe=skipped)


def _prepare(row: Row, index: int, width: int, first_line_of: dict[str, int],
             unsafe: dict[int, str]) -> NewRecipient:
    values = row.values
    raw_email = values[index] if index < len(values) else ""
    if len(values) != width:
        return _invalid(row.line, raw_email, f"expected {width} fields, found {len(values)}")
    check = check_address(raw_email)
    if not check.ok:
        return _invalid(row.line, raw_email, check.reason)
    if check.key in first_line_of:
        return _invalid(row.line, check.address, f"duplicate of line {first_line_of[check.key]}")
    if row.line in unsafe:
        return _invalid(row.line, check.address, f"{UNSAFE}{unsafe[row.line]}")
    first_line_of[check.key] = row.line
    fields = _encode(values[:index] + values[index + 1:])  # all but the email column
    return NewRecipient(row.line, check.address, check.key, fields, "queued", None)


def _mark_earlier_duplicate(row: NewRecipient, earlier: dict[str, int]) -> NewRecipient:
    """A row whose address an earlier chunk of the list already holds."""
    if row.key is None or row.key not in earlier:
        return row
    return _invalid(row.line, row.email, f"duplicate of line {earlier[row.key]}")


def _mark_suppressed(journal: Journal, rows: list[NewRecipient]) -> list[NewRecipient]:
    """Addresses on the suppression list are kept as `suppressed`, never sent."""
    keys = {r.line: r.key.casefold() for r in rows if r.key is not None and r.state == "queued"}
    found = journal.suppressed(set(keys.values()))
    if not found:
        return rows
    return [
        r._replace(state="suppressed", reply=suppressed_reply(found[keys[r.line]]))
        if r.line in keys and keys[r.line] in found else r
        for r in rows
    ]


def _invalid(line: int, email: str, reason: str) -> NewRecipient:
    return NewRecipient(line, email, None, None, "invalid", reason)
