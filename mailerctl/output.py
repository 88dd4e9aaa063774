"""How mailerctl shows things: aligned tables, JSON, and live progress."""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
import sys
import time
from datetime import datetime, timezone
from typing import Any, Iterable, TextIO

import msgspec

from mailerd.schema.control import (
    COUNTED_STATES,
    BounceList,
    CampaignPlan,
    CampaignReport,
    Counts,
    DaemonStatus,
    HostInfo,
    ServerInfo,
)


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    if not math.isfinite(ts):
        return "never" if ts > 0 else "-"
    try:
        return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):  # beyond what the platform's time_t holds
        return "after 9999" if ts > 0 else "before 0001"


# Terminal controls: C0, DEL, C1, and the Unicode line separators and bidi overrides that
# can hide or reorder what a reader sees. Strings from lists, relays and campaign files
# are untrusted: an ESC ] 0 ; ... BEL retitles the terminal, ESC [ 2 J clears it.
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str) -> str:
    """text with every terminal control shown as a visible escape (ESC -> \\x1b)."""
    return _CONTROLS.sub(_escape, text)


def show(text: str, file: TextIO | None = None) -> None:
    """print() for human output: lines kept, any control inside a line made visible."""
    print("\n".join(printable(line) for line in text.split("\n")),
          file=sys.stdout if file is None else file)


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def print_json(value: Any) -> None:
    print(json.dumps(value, ensure_ascii=False, indent=2))


def table(headers: Iterable[str], rows: Iterable[Iterable[Any]]) -> str:
    headers = list(headers)
    cells = [["" if v is None else printable(str(v)) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        widths = [max(w, len(c)) for w, c in zip(widths, row)]
    lines = ["  ".join(h.upper().ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines)


# ---------------------------------------------------------------- CSV

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")  # OWASP: CSV injection


def neutralised(cell: Any) -> Any:
    """A text cell a spreadsheet would run as a formula, prefixed with ' so it stays text."""
    if isinstance(cell, str) and cell.startswith(FORMULA_STARTS):
        return "'" + cell
    return cell


class CsvOutput:
    """csv.writer for untrusted values: formula cells neutralised unless raw; on a
    terminal, controls are made visible as everywhere else."""

    def __init__(self, stream: TextIO, raw: bool = False) -> None:
        self.writer = csv.writer(stream)
        self.raw = raw
        self.tty = stream.isatty()

    def writerow(self, row: Iterable[Any]) -> None:
        cells = list(row) if self.raw else [neutralised(c) for c in row]
        if self.tty:
            cells = [printable(c) if isinstance(c, str) else c for c in cells]
        self.writer.writerow(cells)


# ---------------------------------------------------------------- reports


def report_json(report: CampaignReport) -> dict[str, Any]:
    data: dict[str, Any] = {
        "id": report.id,
        "name": report.name,
        "state": report.state,
        "total": report.total,
        "counts": msgspec.to_builtins(report.counts),
        "created": iso(report.created),
        "updated": iso(report.updated),
        "rate": round(report.rate, 2),
        "eta": report.eta and round(report.eta, 1),
    }
    if report.recipients is not None:
        data["recipients"] = [
            {
                "email": r.email, "line": r.line, "state": r.state, "attempts": r.attempts,
                "code": r.code, "reply": r.reply, "updated": iso(r.updated),
                "server": r.server, "dot_sent": iso(r.dot_at), "message_id": r.message_id,
            }
            for r in report.recipients
        ]
    return data


def counts_row(counts: Counts) -> list[int]:
    return [getattr(counts, name) for name in COUNTED_STATES]


def report_text(report: CampaignReport) -> str:
    lines = [f"campaign {report.id}  {report.name!r}  {report.state}"]
    lines.append(table(("total", *COUNTED_STATES), [[report.total, *counts_row(report.counts)]]))
    if report.counts.bounced or report.counts.complained:
        lines.append(f"came back after sending: bounced {report.counts.bounced}, "
                     f"complained {report.counts.complained}  (mailerctl bounces {report.id})")
    if report.state == "running":
        lines.append(f"rate {report.rate:.1f}/s  eta {duration(report.eta)}")
    if report.recipients is not None and report.recipients and \
            all(r.state == "uncertain" for r in report.recipients):
        lines.append("")
        lines.append(table(
            ("line", "email", "server", "dot sent", "message-id", "reply"),
            [[r.line, r.email, r.server, iso(r.dot_at), r.message_id, _one_line(r.reply)]
             for r in report.recipients]))
    elif report.recipients is not None:
        lines.append("")
        lines.append(table(
            ("line", "email", "state", "attempts", "code", "updated", "reply"),
            [[r.line, r.email, r.state, r.attempts, r.code, iso(r.updated), _one_line(r.reply)]
             for r in report.recipients],
        ) if report.recipients else "(no recipients in that state)")
    return "\n".join(lines)


def _one_line(text: str | None) -> str:
    return "" if text is None else " ".join(text.split())


def campaign_table(reports: list[CampaignReport]) -> str:
    if not reports:
        return "(no campaigns)"
    return table(
        ("id", "name", "state", "total", *COUNTED_STATES),
        [[r.id, r.name, r.state, r.total, *counts_row(r.counts)] for r in reports],
    )


def status_json(status: DaemonStatus) -> dict[str, Any]:
    data = msgspec.to_builtins(status)
    data.pop("kind", None)
    data["campaigns"] = [report_json(r) for r in status.campaigns]
    return data


def bounces_json(answer: BounceList) -> dict[str, Any]:
    return {
        "bounces": [{**msgspec.to_builtins(b), "t": iso(b.t)} for b in answer.bounces],
        "unmatched": [{**msgspec.to_builtins(u), "t": iso(u.t)} for u in answer.unmatched],
    }


def bounces_text(answer: BounceList) -> str:
    lines = [table(("campaign", "line", "email", "kind", "status", "received", "diagnostic"),
                   [[b.campaign, b.line, b.email, b.kind, b.status or "", iso(b.t),
                     _one_line(b.diagnostic)] for b in answer.bounces])
             if answer.bounces else "(nothing came back)"]
    if answer.unmatched:
        lines += ["", "mailbox messages that named no recipient of ours (forged, foreign, unknown):",
                  table(("received", "mailbox", "format", "summary"),
                        [[iso(u.t), u.mailbox, u.format, _one_line(u.summary)]
                         for u in answer.unmatched])]
    return "\n".join(lines)


def server_text(server: ServerInfo) -> list[str]:
    state = server.state
    if server.reason:
        state += f" ({server.reason})"
    if server.until:
        state += f" until {iso(server.until)}"
    windows = server.windows
    lines = [
        f"server {server.name}  {server.host}:{server.port}  {state}",
        f"  connections {server.effective_connections} of {server.connections}  "
        f"messages/connection {server.messages_per_connection or '-'}  "
        f"rate {rate_text(server)}",
        f"  sent: last minute {windows.get('minute', 0)}, hour {windows.get('hour', 0)}, "
        f"day {windows.get('day', 0)}  sessions ended {server.sessions_ended}, "
        f"dropped {server.drops}, refused {server.refused}",
    ]
    if server.learned:
        lines.append("  learned: " + ", ".join(f"{k}={v}" for k, v in server.learned.items()))
    if server.settings:
        lines.append("  set at run time: " + ", ".join(f"{k}={v}" for k, v in server.settings.items()))
    return lines


def rate_text(server: ServerInfo) -> str:
    """This host's rate; with several hosts sending through the account, its part of it."""
    if not server.rate:
        return "-"
    if server.hosts <= 1 or not server.account_rate:
        return f"{server.rate:.3g}/s"
    return f"{server.rate:.3g}/s of {server.account_rate:.3g}/s ({server.hosts} hosts)"


def plan_json(plan: CampaignPlan) -> dict[str, Any]:
    data = msgspec.to_builtins(plan)
    data.pop("kind", None)
    data["finish"] = iso(plan.finish)
    return data


def plan_text(plan: CampaignPlan) -> str:
    if plan.left == 0:
        head = f"campaign {plan.id}: nothing left to send"
    elif plan.seconds is None:
        head = (f"campaign {plan.id}: {plan.left} left; no estimate yet "
                "(no rate is set and nothing has been sent recently)")
    else:
        head = (f"campaign {plan.id}: {plan.left} left, about {duration(plan.seconds)} "
                f"(finish {iso(plan.finish)})")
    rows = [[p.server, f"{p.rate:.3g}/s", p.state, p.reason] for p in plan.servers]
    return head + "\n" + table(("server", "rate", "state", "why"), rows)


def status_text(status: DaemonStatus) -> str:
    lines = [f"mailerd {status.version}  pid {status.pid}  up {duration(status.uptime)}  "
             f"state {status.state_dir}", ""]
    if status.journal_error:
        lines[1:1] = [f"NOT SENDING: {status.journal_error}", ""]
    if status.hosts:
        lines += [hosts_table(status.hosts), ""]
    for server in status.servers:
        lines += server_text(server)
        lines.append(table(
            ("slot", "pid", "state", "sent", "restarts", "doing"),
            [[w.slot, w.pid, w.state, w.sent, w.restarts, w.detail] for w in server.workers],
        ))
        lines.append("")
    for box in status.mailboxes:
        state = f"error: {box.last_error}" if box.last_error else "ok"
        idle = f"  idle {box.idle} since {iso(box.idle_since)}" if box.idle != "off" else ""
        lines.append(f"bounce mailbox {box.name} ({box.protocol}){idle}  last poll "
                     f"{iso(box.last_poll)}  {state}  read {box.read}  left in the mailbox "
                     f"{len(box.left)}")
        if box.idle_error:
            lines.append(f"  idle: {box.idle_error}")
        lines += [f"  left: {why}" for why in box.left]
    if status.mailboxes:
        lines.append("")
    lines.append(campaign_table(status.campaigns) if status.campaigns else "(no active campaigns)")
    return "\n".join(lines)


def hosts_table(hosts: list[HostInfo]) -> str:
    """The daemons sharing this one's PostgreSQL journal, this one among them."""
    return table(("host", "generation", "renewed", "sessions", "state"),
                 [[h.host, h.generation, iso(h.renewed_at), h.sessions,
                   "alive" if h.alive else "lease expired"] for h in hosts])


# ---------------------------------------------------------------- progress


def bar(done: int, total: int, width: int) -> str:
    filled = int(width * done / total) if total else width
    return "#" * filled + "-" * (width - filled)


class EnqueueProgress:
    """Bytes of the list read so far, on stderr (only when it is a terminal)."""

    def __init__(self, size: int) -> None:
        self.size = max(size, 1)
        self.last = 0.0

    def update(self, position: int) -> None:
        now = time.monotonic()
        if now - self.last < 0.2:
            return
        self.last = now
        pct = min(100, 100 * position // self.size)
        sys.stderr.write(f"\rreading list [{bar(pct, 100, 30)}] {pct:3d}%")
        sys.stderr.flush()

    def finish(self) -> None:
        sys.stderr.write("\r" + " " * 50 + "\r")
        sys.stderr.flush()


class WatchView:
    """One redrawn line on a terminal; a line every few seconds otherwise."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.last_print = 0.0
        self.waiting_since: float | None = None

    def line(self, report: CampaignReport) -> str:
        c = report.counts
        finished = c.sent + c.failed + c.uncertain + c.invalid + c.suppressed
        pct = 100 * finished / report.total if report.total else 100.0
        return (f"[{bar(finished, report.total, 24)}] {pct:5.1f}%  sent {c.sent}  "
                f"queued {c.queued}  sending {c.sending}  deferred {c.deferred}  "
                f"failed {c.failed}  uncertain {c.uncertain}  invalid {c.invalid}  "
                f"suppressed {c.suppressed}  "
                f"{report.rate:.1f}/s  eta {duration(report.eta)}  {report.state}")

    def show(self, report: CampaignReport) -> None:
        text = self.line(report)
        if self.waiting_since is not None:
            self.waiting_since = None
            self.last_print = 0.0  # the first line after an outage is always shown
        if self.tty:
            width = shutil.get_terminal_size().columns
            self.stream.write("\r" + text[: width - 1].ljust(width - 1))
        elif time.monotonic() - self.last_print >= 2 or report.state in ("done", "cancelled"):
            self.stream.write(text + "\n")
            self.last_print = time.monotonic()
        else:
            return
        self.stream.flush()

    def finish(self, report: CampaignReport) -> None:
        """The last show() already printed the final counts; end the line on a terminal."""
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()

    def waiting(self, reason: str) -> None:
        """The daemon went away: said once per outage, on stderr; show() ends the outage."""
        if self.waiting_since is None:
            self.waiting_since = time.time()
            if self.tty:
                self.stream.write("\n")
                self.stream.flush()
            print(f"mailerctl: {printable(reason)}; waiting for mailerd to come back "
                  f"(since {iso(self.waiting_since)})", file=sys.stderr, flush=True)

    def interrupted(self) -> None:
        self.stream.write("\n")
        self.stream.flush()
