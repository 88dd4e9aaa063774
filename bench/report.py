"""Results as Markdown tables: printed by `python -m bench`, kept in bench/RESULTS.md."""

from __future__ import annotations

import math
from pathlib import Path

NOTES_HEADING = "## Notes"
CONTENDERS = (
    ("mailerd", "mailerd (end to end, journal on)"),
    ("smtp_source", "smtp-source -d (C, no journal)"),
    ("prebuilt", "aiosmtplib, prebuilt message"),
    ("prebuilt_uvloop", "aiosmtplib, prebuilt message, uvloop"),
    ("ceiling", "transport ceiling: C processes × 1 session, prebuilt, uvloop"),
    ("naive", "naive loop, EmailMessage per recipient"),
)
RATIO_KEY = {"smtp_source": "vs_smtp_source", "prebuilt": "vs_prebuilt",
             "prebuilt_uvloop": "vs_prebuilt_uvloop", "ceiling": "vs_ceiling",
             "naive": "vs_naive"}


def markdown(results: dict) -> str:
    parts = [_machine(results)]
    if "throughput" in results:
        parts.append(_throughput(results["throughput"]))
    if "scale" in results:
        parts.append(_scale(results["scale"]))
    if "journal_cost" in results:
        parts.append(_journal(results["journal_cost"]))
    if "dkim" in results:
        from . import dkim  # its own table, next to its scenario

        parts.append(dkim.markdown(results["dkim"]))
    if "longlink" in results:
        from .longlink import markdown as longlink_markdown
        parts.append(longlink_markdown(results["longlink"]))
    if "cluster" in results:
        from .cluster import markdown as cluster_markdown
        parts.append(cluster_markdown(results["cluster"]))
    return "\n\n".join(parts) + "\n"


def write_results_md(path: Path, results: dict) -> None:
    """Rewrite everything above the Notes section; keep the notes as they are."""
    notes = ""
    if path.exists():
        text = path.read_text()
        at = text.find(NOTES_HEADING)
        notes = text[at:] if at >= 0 else ""
    header = ("# Benchmark results\n\nWritten by `python -m bench --markdown bench/RESULTS.md` "
              "(see bench/__init__.py for what each scenario measures). Medians of the runs "
              "in one invocation; only the ratios are comparable across machines.\n\n")
    path.write_text(header + markdown(results) + ("\n" + notes if notes else ""))


def _machine(results: dict) -> str:
    machine = results.get("machine", {})
    lines = ["| machine | |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in machine.items()]
    lines.append(f"| mode | {results.get('mode', '')} |")
    return "\n".join(lines)


def _throughput(result: dict) -> str:
    out = [f"### 1. Throughput, end to end: N = {result['count']:,} "
           f"(naive loop: {result['naive_count']:,}), 2 KB text+html, 3 merge fields, "
           f"against smtp-sink; median of {result['repeats']}"]
    for sessions, at in result["by_sessions"].items():
        out += ["", f"C = {sessions} sessions", "",
                "| contender | msg/s | CPU ms/msg | mailerd ÷ this |", "|---|---:|---:|---:|"]
        for key, label in CONTENDERS:
            if key not in at:  # results from before this contender was added
                continue
            median = at[key]["median"]
            ratio = at["ratios"].get(RATIO_KEY.get(key, ""), None)
            out.append(f"| {label} | {median['rate']:,.0f} | {median['cpu_ms_per_msg']:.3f} | "
                       f"{_num(ratio, 2) if ratio is not None else ''} |")
        m = at["mailerd"]["median"]
        out += ["", f"mailerd CPU per message: daemon {m['daemon_cpu_ms_per_msg']:.3f} ms "
                f"(of which journal thread {m['journal_cpu_ms_per_msg']:.3f}, "
                f"{100 * m['journal_cpu_share']:.1f} % of all), workers "
                f"{m['workers_cpu_ms_per_msg']:.3f} ms; enqueue {m['enqueue_wall']:.2f} s"]
    out += ["", _targets(result.get("targets", {}), "×", at_least=True)]
    return "\n".join(out)


def _scale(result: dict) -> str:
    s = result["summary"]
    rows = [
        ("enqueue (mailerctl, wall)", f"{s['enqueue_s']:.1f} s ({s['enqueue_rows_per_s']:,.0f} rows/s)"),
        ("journal on disk after enqueue", f"{s['journal_mb']:.0f} MB "
                                          f"({s['journal_bytes_per_recipient']:.0f} B/recipient)"),
        ("report (counts, over the socket)", f"{1000 * s['report_s']:.0f} ms"),
        ("`mailerctl report --json` (incl. interpreter start)", f"{1000 * s['report_cli_s']:.0f} ms"),
        (f"peak PSS, daemon + {result['sessions']} workers, list of {result['sample']:,}",
         f"{s['pss_mb_small']:.0f} MB"),
        (f"peak PSS, daemon + {result['sessions']} workers, list of {result['count']:,}",
         f"{s['pss_mb_big']:.0f} MB"),
        ("kill -9 + restart to first new message sent", f"{_num(s['restart_s'], 2)} s"),
    ]
    out = [f"### 2. Scale: {result['count']:,} recipients, 3 merge fields; memory while "
           f"sending the first {result['sample']:,}", "", "| | |", "|---|---:|"]
    out += [f"| {name} | {value} |" for name, value in rows]
    out += ["", _targets(result.get("targets", {}), "", at_least=False)]
    return "\n".join(out)


def _journal(result: dict) -> str:
    out = ["### 3. Journal cost", ""]
    cpu = result.get("cpu") or {}
    if cpu:
        out.append(f"Journal thread: {100 * cpu['journal_cpu_share']:.1f} % of daemon + worker "
                   f"CPU ({cpu['journal_cpu_ms_per_msg']:.3f} of {cpu['cpu_ms_per_msg']:.3f} "
                   "ms per message, C = 16 runs of scenario 1).")
    window = result["window"]
    out += ["", f"Uncertain window, one session, {window['count']:,} messages, median of "
            f"{window['repeats']}:", "", "| DotAck sent | ms per message |", "|---|---:|"]
    for mode, value in window["ms_per_msg"].items():
        out.append(f"| {mode} | {value:.3f} |")
    out += ["", f"Added latency per message of committing data-sent before the dot: "
            f"{window['added_ms_full']:.3f} ms with journal_sync=full, "
            f"{window['added_ms_normal']:.3f} ms with normal."]
    out += ["", _targets(result.get("targets", {}), "", at_least=False)]
    return "\n".join(out)


def _targets(targets: dict, unit: str, at_least: bool) -> str:
    if not targets:
        return ""
    lines = ["| target | measured | met |", "|---|---:|:---:|"]
    for name, t in targets.items():  # a target may say its own unit and sense
        sign = "≤" if t.get("at_most", not at_least) else "≥"
        its_unit = t.get("unit", unit)
        lines.append(f"| {name} {sign} {t['target']}{its_unit} | {_num(t['measured'], 3)}"
                     f"{its_unit} | {'yes' if t['met'] else '**no**'} |")
    return "\n".join(lines)


def _num(value: float | None, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"
