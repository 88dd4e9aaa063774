"""mailerctl: control a running mailerd.

Exit codes: 0 ok, 1 the daemon refused (the message says why), 2 usage or bad
input files, 3 the daemon cannot be reached.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from typing import Callable, Iterator

import msgspec

from mailerd import __version__, wire
from mailerd.schema.control import (
    BOUNCE_STATES,
    COUNTED_STATES,
    BounceList,
    Bounces,
    Plan,
    SetPacing,
    Settle,
    Cancel,
    CampaignReport,
    DebugFreeze,
    Explain,
    Explained,
    Enqueued,
    EnqueueBegin,
    EnqueueCommit,
    EnqueueRows,
    ListCampaigns,
    Pause,
    Report,
    Resume,
    RowsAccepted,
    Status,
)

from . import output
from .campaign import InputError, RecipientList, load_campaign_files
from . import messages
from .client import (SYSTEM_SOCKET, Client, PermissionDenied, Refused, Unreachable, Untrusted,
                     socket_path)

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
EXIT_CLOSED_PIPE = 128 + 13  # what a shell shows for a command ended by SIGPIPE
CHUNK_ROWS = 2000


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mailerctl", description="Control a running mailerd.")
    parser.add_argument("--version", action="version", version=f"mailerctl {__version__}")
    parser.add_argument("--socket", help=f"control socket (default: $MAILERD_SOCKET, else "
                        f"{SYSTEM_SOCKET}); it must belong to root, you, or the daemon's user "
                        "(mailerd, or $MAILERD_USER)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("enqueue", help="add a campaign and its recipient list")
    p.add_argument("campaign_file", metavar="CAMPAIGN.toml")
    p.add_argument("--recipients", "-r", required=True, metavar="LIST.csv")
    p.add_argument("--skip-unsafe", action="store_true",
                   help="keep rows whose merge values cannot go into a message safely (control "
                        "characters, encoded words that decode to them) as invalid instead of "
                        "refusing the campaign")
    p.add_argument("--json", action="store_true")

    for name, text in (("pause", "stop starting new transactions"),
                       ("cancel", "stop a campaign for good")):
        p = sub.add_parser(name, help=text)
        p.add_argument("id", type=int)
        p.add_argument("--json", action="store_true")

    p = sub.add_parser("resume", help="send every recipient not yet sent")
    p.add_argument("id", type=int)
    p.add_argument("--include-uncertain", action="store_true",
                   help="also resend recipients whose delivery is uncertain")
    p.add_argument("--retry-failed", action="store_true", help="also retry failed recipients")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("status", help="daemon, servers, workers and campaigns")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("report", help="counts per state, or the recipients in one state")
    p.add_argument("id", type=int, nargs="?")
    p.add_argument("--state", choices=COUNTED_STATES + BOUNCE_STATES,
                   help="bounced, complained: those sent for whom a bounce or complaint came back")
    p.add_argument("--limit", type=int)
    p.add_argument("--csv", action="store_true",
                   help="every recipient (or those in --state) as CSV: email, state, attempts, "
                        "code, reply, sent_at, line, message_id")
    p.add_argument("--raw-csv", action="store_true",
                   help="with --csv: write cells starting with = + - @ as they are (by default "
                        "they get a leading ' so that a spreadsheet does not run them as formulas)")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("bounces", help="bounces and complaints that came back ([bounces] mailboxes)")
    p.add_argument("id", type=int, nargs="?", help="only this campaign's (default: all, and the "
                   "mailbox messages that named no recipient of ours)")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("list", help="all campaigns")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("set", help="change a server's pacing in the running daemon")
    p.add_argument("server")
    p.add_argument("settings", nargs="*", metavar="KEY=VALUE",
                   help="connections, group_size, group_interval, messages_per_connection, rate, "
                        "hourly_quota, daily_quota, idle_timeout, clean_period, quota_cooloff; "
                        "learned=forget drops what was learned")
    p.add_argument("--reset", nargs="*", metavar="KEY",
                   help="drop the run-time settings named (all when none is named): the "
                        "config file's values apply again, on every host")

    p = sub.add_parser("settle", help="decide about uncertain recipients after checking "
                       "the relay's log")
    p.add_argument("id", type=int)
    p.add_argument("--as", dest="as_", choices=("sent", "resend"), required=True,
                   help="sent: the relay has it; resend: send it again")
    p.add_argument("emails", nargs="*", metavar="EMAIL",
                   help="only these (default: every uncertain recipient)")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("plan", help="estimate when a campaign will finish")
    p.add_argument("id", type=int)
    p.add_argument("--json", action="store_true")

    messages.add_preview_parser(sub)
    messages.add_test_send_parser(sub)
    messages.add_suppress_parser(sub)

    # hidden: only a daemon with [daemon] debug_commands = true honours it
    p = sub.add_parser("debug-freeze")
    p.add_argument("seconds", type=float)

    p = sub.add_parser("explain", help="how mailerd reads a relay's reply, and what it would do")
    p.add_argument("reply", metavar="'REPLY TEXT'", help="the reply with its code, e.g. "
                   "'450 4.7.1 Error: too much mail from 192.0.2.1'")
    p.add_argument("--stage", choices=("connect", "mail", "rcpt", "data", "dot"),
                   help="the command it answered (default: show every stage)")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("watch", help="live progress until the campaign is done; waits "
                       "through a daemon restart")
    p.add_argument("id", type=int)
    p.add_argument("--interval", type=float, default=0.5)
    p.add_argument("--reconnect-timeout", type=float, default=300.0, metavar="SECONDS",
                   help="how long to wait for a daemon that went away before giving up "
                        "(default 300)")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command == "settle" and not any(e.startswith("-") for e in extra):
        args.emails += extra  # addresses given after --as
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        code = COMMANDS[args.command](args)
        sys.stdout.flush()  # a closed pipe shows here, not at exit
    except BrokenPipeError:
        code = _quiet_after_closed_pipe()
    except InputError as exc:
        code = _fail(str(exc), EXIT_USAGE)
    except wire.FrameTooLarge as exc:
        code = _fail(f"request too large for the daemon: {exc}", EXIT_USAGE)
    except Refused as exc:
        code = _fail(str(exc), EXIT_REFUSED)
    except Unreachable as exc:
        code = _fail(str(exc), EXIT_UNREACHABLE)
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


def _fail(message: str, code: int) -> int:
    """One line on stderr; the daemon's messages may quote relays and lists, so escaped."""
    try:
        print(f"mailerctl: {output.printable(message)}", file=sys.stderr)
    except BrokenPipeError:
        pass
    return code


def _quiet_after_closed_pipe() -> int:
    """The reader went away (`| head`): stop quietly. stdout now points at /dev/null so
    that the interpreter's final flush does not complain either (Python docs, SIGPIPE)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_CLOSED_PIPE


def connect(args: argparse.Namespace) -> Client:
    return Client(socket_path(args.socket))


# ---------------------------------------------------------------- commands


def cmd_enqueue(args: argparse.Namespace) -> int:
    recipients = RecipientList(args.recipients)
    try:
        spec, files = load_campaign_files(args.campaign_file, recipients.columns)
        with connect(args) as client, _named_if_too_large(args, len(recipients.columns)):
            started = client.call(EnqueueBegin(spec=spec))
            assert isinstance(started, Enqueued)
            messages.send_attachments(client, started.campaign, files)
            progress = output.EnqueueProgress(recipients.size) if sys.stderr.isatty() else None
            invalid, unsafe = _stream_rows(client, started.campaign, recipients, progress,
                                           args.skip_unsafe)
            report = client.call(EnqueueCommit(campaign=started.campaign))
            if progress:
                progress.finish()
    finally:
        recipients.close()
    assert isinstance(report, CampaignReport)
    if args.json:
        output.print_json({"id": report.id, "total": report.total, "invalid": invalid,
                           "unsafe": unsafe})
    else:
        print(report.id)
        if unsafe:
            print(f"mailerctl: {unsafe} rows have unsafe merge values and were kept as invalid "
                  "(--skip-unsafe)", file=sys.stderr)
        if invalid:
            print(f"mailerctl: {invalid} of {report.total} rows are invalid; "
                  f"see: mailerctl report {report.id} --state invalid", file=sys.stderr)
    return EXIT_OK


@contextlib.contextmanager
def _named_if_too_large(args: argparse.Namespace, columns: int) -> Iterator[None]:
    """A request over the frame limit, refused before sending: say which files made it."""
    try:
        yield
    except wire.FrameTooLarge as exc:
        raise InputError(
            f"{args.recipients} (with {args.campaign_file}): a request of {exc.size:,} bytes "
            f"would exceed the daemon's frame limit of {exc.limit:,} bytes "
            f"(the list has {columns:,} columns)") from None


def _stream_rows(client: Client, campaign: int, recipients: RecipientList,
                 progress: "output.EnqueueProgress | None", skip_unsafe: bool) -> tuple[int, int]:
    """Send the list in chunks, one chunk ahead: while the daemon stores chunk k we
    read and send chunk k+1 (its reply is awaited before k+2 goes out).
    Returns the counts of (invalid, unsafe) rows."""
    counts = [0, 0]
    in_flight = 0
    chunk = []
    for row in recipients.rows():
        chunk.append(row)
        if len(chunk) >= CHUNK_ROWS:
            client.send(EnqueueRows(campaign=campaign, rows=chunk, skip_unsafe=skip_unsafe))
            chunk = []
            if in_flight:
                _chunk_reply(client, counts)
            in_flight = 1
            if progress:
                progress.update(recipients.position())
    if chunk:
        client.send(EnqueueRows(campaign=campaign, rows=chunk, skip_unsafe=skip_unsafe))
        in_flight += 1
    for _ in range(in_flight):
        _chunk_reply(client, counts)
    return counts[0], counts[1]


def _chunk_reply(client: Client, counts: list[int]) -> None:
    reply = client.receive()
    assert isinstance(reply, RowsAccepted)
    counts[0] += reply.invalid
    counts[1] += reply.unsafe


def _campaign_command(make_request: Callable[[argparse.Namespace], object]):
    def run(args: argparse.Namespace) -> int:
        with connect(args) as client:
            report = client.call(make_request(args))
        _show_report(report, args.json)
        return EXIT_OK
    return run


cmd_pause = _campaign_command(lambda a: Pause(campaign=a.id))
cmd_cancel = _campaign_command(lambda a: Cancel(campaign=a.id))
cmd_resume = _campaign_command(lambda a: Resume(
    campaign=a.id, include_uncertain=a.include_uncertain, retry_failed=a.retry_failed))
cmd_settle = _campaign_command(lambda a: Settle(
    campaign=a.id, as_sent=a.as_ == "sent", emails=a.emails))


def cmd_bounces(args: argparse.Namespace) -> int:
    with connect(args) as client:
        answer = client.call(Bounces(campaign=args.id))
    if not isinstance(answer, BounceList):
        raise Refused(getattr(answer, "message", "unexpected answer"))
    if args.json:
        output.print_json(output.bounces_json(answer))
    else:
        output.show(output.bounces_text(answer))
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    if args.csv:
        with connect(args) as client:
            return messages.report_csv(client, args.id, args.state, raw=args.raw_csv)
    with connect(args) as client:
        report = messages.report_in_pages(client, args.id, args.state, args.limit)
    _show_report(report, args.json)
    return EXIT_OK


def _show_report(report: object, as_json: bool) -> None:
    if not isinstance(report, CampaignReport):
        output.show(getattr(report, "message", ""))
        return
    if as_json:
        output.print_json(output.report_json(report))
    else:
        output.show(output.report_text(report))


def cmd_debug_freeze(args: argparse.Namespace) -> int:
    """Block the daemon's event loop for SECONDS (to see the systemd watchdog act)."""
    with connect(args) as client:
        reply = client.call(DebugFreeze(seconds=args.seconds))
    output.show(getattr(reply, "message", "") or "ok")
    return EXIT_OK


def _query(args: argparse.Namespace, request: object, as_json: Callable, as_text: Callable) -> int:
    """Send one request and show its reply as JSON (--json) or text."""
    with connect(args) as client:
        reply = client.call(request)
    if args.json:
        output.print_json(as_json(reply))
    else:
        output.show(as_text(reply))
    return EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    return _query(args, ListCampaigns(),
                  lambda r: [output.report_json(c) for c in r.campaigns],
                  lambda r: output.campaign_table(r.campaigns))


def cmd_status(args: argparse.Namespace) -> int:
    return _query(args, Status(), output.status_json, output.status_text)


def cmd_set(args: argparse.Namespace) -> int:
    request = _set_request(args)
    with connect(args) as client:
        reply = client.call(request)
    output.show(getattr(reply, "message", ""))
    return EXIT_OK


def _set_request(args: argparse.Namespace) -> SetPacing:
    if args.reset is not None:
        if args.settings:
            raise InputError("--reset and KEY=VALUE settings: one or the other")
        named = [item for item in args.reset if "=" in item]
        if named:
            raise InputError(f"{named[0]!r}: --reset takes setting names (e.g. rate), "
                             "not KEY=VALUE")
        return SetPacing(server=args.server, settings={}, reset=True,
                         keys=[item.strip() for item in args.reset])
    if not args.settings:
        raise InputError("nothing to set: give KEY=VALUE pairs (or --reset [KEY ...])")
    settings = {}
    for item in args.settings:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InputError(f"{item!r}: expected KEY=VALUE")
        settings[key.strip()] = value.strip()
    return SetPacing(server=args.server, settings=settings)


def cmd_plan(args: argparse.Namespace) -> int:
    return _query(args, Plan(campaign=args.id), output.plan_json, output.plan_text)


def cmd_explain(args: argparse.Namespace) -> int:
    return _query(args, Explain(reply=args.reply, stage=args.stage), _explained_json,
                  _explained_text)


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in " ".join(text.split()))


def _explained_json(explained: Explained) -> dict[str, object]:
    data = msgspec.to_builtins(explained)
    data.pop("kind", None)
    return data


def _explained_text(explained: Explained) -> str:
    code = f" (RFC 3463 {explained.enhanced})" if explained.enhanced else ""
    lines = [f"reply: {explained.code} {_printable(explained.text)}{code}"]
    for r in explained.readings:
        about = f"{r.scope}, {r.cause}" if r.cause else r.scope
        lines.append(f"at {r.stage}: {about}: {r.reason}")
        if r.pattern:
            lines.append(f"  matched {r.pattern!r} ({_printable(r.source or '')})")
        lines.append(f"  mailerd would: {r.action}")
    return "\n".join(lines)


def cmd_watch(args: argparse.Namespace) -> int:
    view = output.WatchView(sys.stdout)
    client: Client | None = None
    lost_since: float | None = None
    try:
        while True:
            try:
                client = client or connect(args)
                report = client.call(Report(campaign=args.id))
            except (PermissionDenied, Untrusted):
                raise
            except Unreachable as exc:  # a restart (Restart=, systemctl restart, a crash)
                if client is not None:
                    client.close()
                    client = None
                lost_since = lost_since or time.monotonic()
                if time.monotonic() - lost_since > args.reconnect_timeout:
                    raise
                view.waiting(str(exc))
                time.sleep(args.interval)
                continue
            lost_since = None
            assert isinstance(report, CampaignReport)
            view.show(report)
            if report.state in ("done", "cancelled"):
                view.finish(report)
                return EXIT_OK
            time.sleep(args.interval)
    except KeyboardInterrupt:
        view.interrupted()
        return EXIT_OK
    finally:
        if client is not None:
            client.close()


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "enqueue": cmd_enqueue,
    "pause": cmd_pause,
    "resume": cmd_resume,
    "cancel": cmd_cancel,
    "report": cmd_report,
    "bounces": cmd_bounces,
    "list": cmd_list,
    "status": cmd_status,
    "watch": cmd_watch,
    "set": cmd_set,
    "plan": cmd_plan,
    "explain": cmd_explain,
    "settle": cmd_settle,
    "debug-freeze": cmd_debug_freeze,
    "preview": messages.cmd_preview,
    "test-send": lambda args: messages.cmd_test_send(args, connect),
    "suppress": lambda args: messages.cmd_suppress(args, connect),
}
