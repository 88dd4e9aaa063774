"""mailerctl's message and list commands: preview, test-send, suppress, report --csv,
and streaming a campaign's attachments at enqueue."""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path
from typing import Callable

import email_validator
import msgspec

from mailerd.message.addresses import allow_special_use_domains, check_address, special_use_name
from mailerd.message.check import SpecError, check_message_parts
from mailerd.schema.config import DeliveryConfig, decode_hook
from mailerd.schema.control import (
    SUPPRESSION_REASONS,
    CampaignReport,
    CampaignSpec,
    EnqueueAttachment,
    ExportRecipients,
    RecipientPage,
    Report,
    SuppressAdd,
    SuppressionPage,
    SuppressList,
    SuppressRemove,
    SuppressResult,
    TestSend,
    TestSent,
    email_column_index,
)
from mailerd.message.render import Attachment, Renderer, RenderError, TemplateError, format_date, needs_smtputf8

from . import output
from .campaign import InputError, RecipientList, attachment_chunks, load_campaign_files, read_toml
from .client import Client

PREVIEW_UID = "preview"
PREVIEW_KEY = b"mailerd-preview-unsubscribe-key!"  # not the daemon's: preview tokens don't verify
SUPPRESS_CHUNK = 5000


# ---------------------------------------------------------------- enqueue


def send_attachments(client: Client, campaign: int, files: list[Path]) -> None:
    for index, path in enumerate(files):
        for chunk, last in attachment_chunks(path):
            client.call(EnqueueAttachment(campaign=campaign, index=index, chunk=chunk, last=last))


# ---------------------------------------------------------------- preview


def add_preview_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("preview", help="print the message one recipient would get (no daemon)")
    p.add_argument("campaign_file", metavar="CAMPAIGN.toml")
    p.add_argument("--recipients", "-r", required=True, metavar="LIST.csv")
    p.add_argument("--row", type=int, default=1,
                   help="the N-th recipient row of the list (default 1, the first after the header)")
    p.add_argument("--config", metavar="FILE",
                   help="the daemon's config file (e.g. /etc/mailerd/mailerd.toml): addresses on "
                        "the special-use domains its [delivery] allow_special_use_domains names "
                        "are accepted, as the daemon accepts them (without it, they are invalid)")


def cmd_preview(args: argparse.Namespace) -> int:
    if args.config:
        allow_special_use_domains(daemon_special_use_domains(Path(args.config)))
    recipients = RecipientList(args.recipients)
    try:
        spec, files = load_campaign_files(args.campaign_file, recipients.columns)
        _check(spec)
        row = None
        if args.row >= 1:
            for number, candidate in enumerate(recipients.rows(), 1):
                if number == args.row:
                    row = candidate
                    break
    finally:
        recipients.close()
    if row is None:
        raise InputError(f"{args.recipients}: there is no recipient row {args.row}")
    index = email_column_index(spec.columns)
    if len(row.values) != len(spec.columns):
        raise InputError(f"{args.recipients}: line {row.line}: expected {len(spec.columns)} fields, "
                         f"found {len(row.values)}")
    check = check_address(row.values[index])
    if not check.ok:
        raise InputError(f"{args.recipients}: line {row.line}: {check.reason}"
                         f"{_special_use_hint(check.address, args.config)}")
    fields = [v for i, v in enumerate(row.values) if i != index]
    attachments = [Attachment(info.name, info.content_type, path.read_bytes())
                   for info, path in zip(spec.attachments, files)]
    sender = spec.sender
    try:
        renderer = Renderer.from_spec(spec, PREVIEW_UID, attachments, PREVIEW_KEY)
        message = renderer.render(line=row.line, email=check.address, fields=fields,
                                  date=format_date(time.time()),
                                  smtputf8=needs_smtputf8(check.address, sender))
    except (TemplateError, RenderError) as exc:
        raise InputError(f"line {row.line}: {exc}") from None
    print(f"mailerctl: preview of line {row.line} ({check.address}); the daemon's campaign id, "
          f"unsubscribe key and DKIM signature differ: Message-ID and token here use campaign "
          f"uid {PREVIEW_UID!r}, no DKIM-Signature is shown", file=sys.stderr)
    sys.stdout.buffer.write(message.replace(b"\r\n", b"\n"))
    sys.stdout.flush()
    return 0


def daemon_special_use_domains(path: Path) -> list[str]:
    """[delivery] allow_special_use_domains of the daemon's config file, checked as the
    daemon checks its [delivery] table."""
    raw = read_toml(path, "config")
    try:
        delivery = msgspec.convert(raw.get("delivery", {}), DeliveryConfig, dec_hook=decode_hook)
    except msgspec.ValidationError as exc:
        raise InputError(f"{path}: [delivery]: {exc} (`mailerd --config {path} --check-config` "
                         "names the key)") from None
    return delivery.allow_special_use_domains


def _special_use_hint(address: str, config: str | None) -> str:
    """For an address the daemon could be told to accept, how preview can agree with it."""
    name = special_use_name(address)
    if name is None or config:
        return ""
    return (f" (a daemon whose [delivery] allow_special_use_domains names {name!r} accepts it: "
            "give preview that config with --config FILE)")


def _check(spec: CampaignSpec) -> None:
    try:
        check_message_parts(spec)
    except SpecError as exc:
        raise InputError(f"campaign: {exc}") from None


# ---------------------------------------------------------------- test-send


def add_test_send_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("test-send", help="send one copy through the daemon's first server")
    p.add_argument("campaign_file", metavar="CAMPAIGN.toml")
    p.add_argument("--to", required=True, metavar="ADDR")
    p.add_argument("--fields", nargs="*", default=[], metavar="NAME=VALUE",
                   help="merge fields for the templates")
    p.add_argument("--json", action="store_true")


def cmd_test_send(args: argparse.Namespace, connect: Callable[[argparse.Namespace], Client]) -> int:
    fields: dict[str, str] = {}
    for item in args.fields:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InputError(f"--fields {item!r}: expected NAME=VALUE")
        fields[key.strip()] = value
    spec, files = load_campaign_files(args.campaign_file, ["email", *fields])
    # the daemon checks the campaign again with its own [delivery] allow_special_use_domains:
    # here only what no daemon would accept is refused
    allow_special_use_domains(sorted(email_validator.SPECIAL_USE_DOMAIN_NAMES))
    _check(spec)
    data = [path.read_bytes() for path in files]
    with connect(args) as client:
        reply = client.call(TestSend(spec=spec, to=args.to, fields=fields, attachments=data))
    assert isinstance(reply, TestSent)
    if args.json:
        output.print_json({"server": reply.server, "code": reply.code, "reply": reply.reply,
                           "message_id": reply.message_id})
    else:
        output.show(f"{reply.server}: {reply.code} {reply.reply}  (Message-ID {reply.message_id})")
    return 0 if reply.code is not None and 200 <= reply.code < 300 else 1


# ---------------------------------------------------------------- suppress


def add_suppress_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("suppress", help="the global suppression list")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    a = actions.add_parser("add", help="never send to these addresses")
    a.add_argument("emails", nargs="+", metavar="ADDR")
    a.add_argument("--reason", choices=SUPPRESSION_REASONS, default="manual")
    a = actions.add_parser("remove", help="take addresses off the list")
    a.add_argument("emails", nargs="+", metavar="ADDR")
    a = actions.add_parser("list", help="print the list")
    a.add_argument("--json", action="store_true")
    a = actions.add_parser("import", help="add every address of a file (CSV with an email "
                                          "column, or one address per line)")
    a.add_argument("file", metavar="FILE")
    a.add_argument("--reason", choices=SUPPRESSION_REASONS, default="manual")


def cmd_suppress(args: argparse.Namespace, connect: Callable[[argparse.Namespace], Client]) -> int:
    with connect(args) as client:
        if args.action == "add":
            result = client.call(SuppressAdd(emails=args.emails, reason=args.reason))
            return _show_added(result, len(args.emails))
        if args.action == "remove":
            result = client.call(SuppressRemove(emails=args.emails))
            assert isinstance(result, SuppressResult)
            print(f"removed {result.removed} of {len(args.emails)}")
            return 0
        if args.action == "list":
            return _list(client, args.json)
        return _import(client, Path(args.file), args.reason)


def _show_added(result: object, given: int) -> int:
    assert isinstance(result, SuppressResult)
    print(f"added {result.added} of {given} (already listed: {given - result.added - result.invalid}, "
          f"invalid: {result.invalid})")
    for example in result.examples:
        output.show(f"  invalid {example}", file=sys.stderr)
    return 0


def _list(client: Client, as_json: bool) -> int:
    after, rows = "", []
    writer = None if as_json else output.CsvOutput(sys.stdout)
    if writer is not None:
        writer.writerow(["email", "reason", "added", "detail"])
    while True:
        page = client.call(SuppressList(after=after, limit=5000))
        assert isinstance(page, SuppressionPage)
        for entry in page.entries:
            item = [entry.email, entry.reason, output.iso(entry.added), entry.detail or ""]
            if writer is not None:
                writer.writerow(item)
            else:
                rows.append(dict(zip(("email", "reason", "added", "detail"), item)))
        if len(page.entries) < 5000:
            break
        after = page.entries[-1].key
    if as_json:
        output.print_json(rows)
    return 0


def suppression_file_addresses(path: Path):
    """Addresses of a CSV list with an email column, or of a file of one per line."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            first = handle.readline()
            delimiter = max(",;\t", key=first.count)
            header = next(csv.reader([first], delimiter=delimiter), [])
            index = email_column_index(header)
            if index is not None:
                for values in csv.reader(handle, delimiter=delimiter):
                    if len(values) > index and values[index].strip():
                        yield values[index]
                return
            if first.strip():
                yield first.strip()
            for line in handle:
                if line.strip():
                    yield line.strip()
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _import(client: Client, path: Path, reason: str) -> int:
    given = added = invalid = 0
    examples: list[str] = []
    chunk: list[str] = []

    def flush() -> None:
        nonlocal added, invalid
        result = client.call(SuppressAdd(emails=chunk, reason=reason))
        assert isinstance(result, SuppressResult)
        added += result.added
        invalid += result.invalid
        examples.extend(result.examples[: 5 - len(examples)])
        chunk.clear()

    for address in suppression_file_addresses(path):
        given += 1
        chunk.append(address)
        if len(chunk) >= SUPPRESS_CHUNK:
            flush()
    if chunk:
        flush()
    print(f"imported {path}: {given} addresses, {added} added, "
          f"{given - added - invalid} already listed, {invalid} invalid")
    for example in examples:
        output.show(f"  invalid {example}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------- report


def report_in_pages(client: Client, campaign: int | None, state: str | None,
                    limit: int | None) -> CampaignReport:
    """A campaign's report; with a state, every recipient in it (or the first `limit`),
    asked for a page at a time: the daemon's reply is bounded by its frame (review L6)."""
    report = client.call(Report(campaign=campaign, state=state, limit=limit))
    assert isinstance(report, CampaignReport)
    if state is None or report.recipients is None:
        return report
    wanted = getattr(report.counts, state)
    if limit is not None:
        wanted = min(wanted, limit)
    while 0 < len(report.recipients) < wanted:
        page = client.call(ExportRecipients(
            campaign=report.id, state=state, after_line=report.recipients[-1].line,
            limit=wanted - len(report.recipients)))
        assert isinstance(page, RecipientPage)
        report.recipients += page.recipients
        if not page.recipients or page.next_line is None:
            break
    return report


# ---------------------------------------------------------------- report --csv

CSV_COLUMNS = ("email", "state", "attempts", "code", "reply", "sent_at", "line", "message_id")


def report_csv(client: Client, campaign: int | None, state: str | None, raw: bool = False) -> int:
    writer = output.CsvOutput(sys.stdout, raw=raw)
    writer.writerow(CSV_COLUMNS)
    after = 0
    while True:
        page = client.call(ExportRecipients(campaign=campaign, state=state, after_line=after))
        assert isinstance(page, RecipientPage)
        for r in page.recipients:
            sent_at = output.iso(r.dot_at) if r.state in ("sent", "uncertain") else None
            writer.writerow([r.email, r.state, r.attempts, "" if r.code is None else r.code,
                             r.reply or "", sent_at or "", r.line, r.message_id or ""])
        if page.next_line is None:
            return 0
        after = page.next_line
