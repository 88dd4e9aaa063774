"""Scenario 2: a million-recipient campaign (CSV with an email column and 3 merge fields).

  enqueue       `mailerctl enqueue` wall time for the whole list
  journal size  journal.sqlite3 (+ -wal, -shm) right after the enqueue
  report        a counts report on that campaign, while it is sending
  memory        peak PSS (smaps_rollup) of the daemon + its workers while sending
                the first `sample` recipients, for the big list and for a list of
                only `sample` recipients: it must not grow with the list
  restart       kill -9 of daemon and workers mid-campaign, start again: time
                from the kill to the first new message recorded as sent
Enqueue repeats use a relay port nobody listens on, so no sending competes.
"""

from __future__ import annotations

import random
import tempfile
import time
from pathlib import Path

from mailerd.schema.control import Report
from mailerd.testing.ports import free_port

from . import data
from .mailerd_proc import Mailerd
from .tools import Sink, median, pss_bytes, process_tree, wait_for

TARGETS = {"enqueue_s": 10.0, "report_s": 0.2, "pss_mb": 200.0, "restart_s": 2.0}
SESSIONS = 8
MB = 1024 * 1024


def run(count: int, sample: int, workdir: Path, repeats: int, restarts: int) -> dict:
    campaign = data.write_campaign(workdir / "campaign")
    big = data.write_list(workdir / "big.csv", count)
    small = data.write_list(workdir / "small.csv", sample)
    result: dict = {"count": count, "sample": sample, "sessions": SESSIONS}
    result["enqueue_extra_runs"] = [_enqueue_only(workdir, campaign, big)
                                    for _ in range(max(repeats - 1, 0))]
    with Sink() as sink:
        result["small"] = _send_sample(sink, workdir, campaign, small, sample, restarts=0)
        result["big"] = _send_sample(sink, workdir, campaign, big, sample, restarts)
    enqueue_walls = [result["big"]["enqueue_s"], *result["enqueue_extra_runs"]]
    result["summary"] = {
        "enqueue_s": median(enqueue_walls),
        "enqueue_rows_per_s": count / median(enqueue_walls),
        "journal_mb": result["big"]["journal_bytes"] / MB,
        "journal_bytes_per_recipient": result["big"]["journal_bytes"] / count,
        "report_s": result["big"]["report_s"],
        "report_cli_s": result["big"]["report_cli_s"],
        "pss_mb_small": result["small"]["peak_pss"] / MB,
        "pss_mb_big": result["big"]["peak_pss"] / MB,
        "restart_s": median(result["big"]["restarts"]) if restarts else float("nan"),
    }
    result["targets"] = _targets(result["summary"])
    return result


def _enqueue_only(workdir: Path, campaign: Path, recipients: Path) -> float:
    with Mailerd(_fresh(workdir), free_port(), SESSIONS) as daemon:
        _, wall = daemon.enqueue(campaign, recipients)
    return wall


def _send_sample(sink: Sink, workdir: Path, campaign: Path, recipients: Path, sample: int,
                 restarts: int) -> dict:
    daemon = Mailerd(_fresh(workdir), sink.port, SESSIONS)
    try:
        daemon.start()
        campaign_id, enqueue_wall = daemon.enqueue(campaign, recipients)
        out = {"enqueue_s": enqueue_wall, "journal_bytes": daemon.journal_files_size()}
        out["report_s"], out["report_cli_s"] = _report_times(daemon, campaign_id)
        out["peak_pss"], out["pss_daemon"], out["pss_workers"] = _peak_pss_until_sent(
            daemon, campaign_id, sample)
        out["restarts"] = [_kill_and_restart(daemon, campaign_id) for _ in range(restarts)]
    finally:
        daemon.__exit__()
    return out


def _report_times(daemon: Mailerd, campaign: int, calls: int = 9) -> tuple[float, float]:
    """Median of counts reports over the control socket, and of `mailerctl report`."""
    timings = []
    for _ in range(calls):
        started = time.perf_counter()
        daemon.call(Report(campaign=campaign))
        timings.append(time.perf_counter() - started)
    cli = [daemon.ctl("report", str(campaign), "--json")[1] for _ in range(3)]
    return median(timings), median(cli)


def _peak_pss_until_sent(daemon: Mailerd, campaign: int, sample: int) -> tuple[int, int, int]:
    peak = (0, 0, 0)
    deadline = time.monotonic() + max(120, sample / 50)
    while _sent(daemon, campaign) < sample:
        if time.monotonic() > deadline:
            raise TimeoutError(f"fewer than {sample} sent before the deadline")
        pids = list(process_tree(daemon.pid))
        own, workers = pss_bytes(pids[0]), sum(pss_bytes(pid) for pid in pids[1:])
        if own + workers > peak[0]:
            peak = (own + workers, own, workers)
        time.sleep(0.25)
    return peak


def _sent(daemon: Mailerd, campaign: int) -> int:
    return daemon.journal_query(
        "SELECT count(*) FROM recipients WHERE campaign=? AND state='sent'", (campaign,))[0][0]


def _kill_and_restart(daemon: Mailerd, campaign: int) -> float:
    time.sleep(random.uniform(1.0, 2.0))  # mid-campaign, at no particular moment
    killed = time.time()
    daemon.kill_group()
    sent_before = _sent(daemon, campaign)  # nothing changes it until the restart
    daemon.start(wait_workers=False)
    wait_for(lambda: _sent(daemon, campaign) > sent_before, 60,
             "the first message after the restart", interval=0.02)
    first = daemon.first_sent_after(campaign, killed)
    return first - killed


def _fresh(workdir: Path) -> Path:
    return Path(tempfile.mkdtemp(prefix="mailerd-", dir=workdir))


def _targets(summary: dict) -> dict:
    measured = {
        "enqueue_s": summary["enqueue_s"],
        "report_s": summary["report_s"],
        "pss_mb": max(summary["pss_mb_small"], summary["pss_mb_big"]),
        "restart_s": summary["restart_s"],
    }
    return {key: {"target": TARGETS[key], "measured": value, "met": value <= TARGETS[key]}
            for key, value in measured.items()}
