"""Scenario 3: what the journal costs.

  cpu share   CPU of the daemon's journal thread (named mailerd-journal) as a share
              of all CPU of daemon + workers, from scenario 1's mailerd runs at C=16
              (every SQLite write and read: enqueue inserts, hand-outs, data-sent,
              outcomes, claims, reports)
  window      the uncertain window: one worker, one session, driven by a stand-in
              supervisor that answers each DotRequest at once ("instant") or only
              after the journal committed `data-sent` ("journal", as the daemon
              does), for journal_sync "full" (the default) and "normal"; the added
              latency per message is journal minus instant
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from .fake_supervisor import FakeSupervisor
from .tools import Sink, median

TARGET_SHARE = 0.10
MODES = (("instant", "full"), ("journal", "full"), ("journal", "normal"))


def run(throughput: dict | None, count: int, repeats: int, workdir: Path) -> dict:
    result: dict = {"cpu": _cpu_share(throughput)}
    result["window"] = _window(count, repeats, workdir)
    share = result["cpu"].get("journal_cpu_share")
    result["targets"] = {} if share is None else {
        "journal_cpu_share": {"target": TARGET_SHARE, "measured": share,
                              "met": share <= TARGET_SHARE}}
    return result


def _cpu_share(throughput: dict | None) -> dict:
    if not throughput:
        return {}
    at = throughput["by_sessions"].get("16") or next(iter(throughput["by_sessions"].values()))
    mailerd = at["mailerd"]["median"]
    return {key: mailerd[key] for key in
            ("journal_cpu_share", "journal_cpu_ms_per_msg", "cpu_ms_per_msg")}


def _window(count: int, repeats: int, workdir: Path) -> dict:
    runs: dict[str, list[float]] = {f"{ack}/{sync}": [] for ack, sync in MODES}
    with Sink() as sink:
        for _ in range(repeats):
            for ack, sync in MODES:
                runs[f"{ack}/{sync}"].append(asyncio.run(
                    _drive(sink.port, count, ack, sync, workdir)))
    ms = {mode: median(values) for mode, values in runs.items()}
    return {
        "count": count, "repeats": repeats, "ms_per_msg": ms, "runs": runs,
        "added_ms_full": ms["journal/full"] - ms["instant/full"],
        "added_ms_normal": ms["journal/normal"] - ms["instant/full"],
    }


async def _drive(port: int, count: int, ack: str, sync: str, workdir: Path) -> float:
    supervisor = FakeSupervisor(Path(tempfile.mkdtemp(prefix="window-", dir=workdir)),
                                port, count, sync)
    try:
        await supervisor.prepare()
        return (await supervisor.drive(ack))["ms_per_msg"]
    finally:
        await supervisor.close()
