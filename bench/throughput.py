"""Scenario 1: end-to-end throughput of mailerd against its floor and a naive client.

For each session count C, interleaved and repeated:
  mailerd          enqueue -> every recipient sent, journal on, per-recipient rendering
  smtp_source      Postfix's C load generator, `smtp-source -d -s C`, no journal
  prebuilt         aiosmtplib, C sessions in one process, one message built once
  prebuilt_uvloop  the same on uvloop (for reference)
  ceiling          the transport ceiling of mailerd's shape: C processes x 1 session
                   (aiosmtplib on uvloop, like mailerd's workers), each sending the
                   prebuilt message, started together; what the process model costs
  naive            EmailMessage built per recipient, then sent, C sessions, one process
all against one smtp-sink. Rates are messages per second of wall time. Targets (at
C = 16): CPU per message end to end, and mailerd's rate against the others.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from . import data
from .mailerd_proc import Mailerd
from .tools import Sink, interleaved, median_of

TARGETS_AT = 16
TARGETS = {"vs_prebuilt": 0.8, "vs_naive": 5.0, "vs_smtp_source": 0.25}  # the last a stretch
CPU_TARGET_MS = 0.30  # mailerd's CPU (daemon + workers) per message, at most
RATIO_OF = {"vs_prebuilt": "prebuilt", "vs_naive": "naive", "vs_smtp_source": "smtp_source",
            "vs_prebuilt_uvloop": "prebuilt_uvloop", "vs_ceiling": "ceiling"}


def run(count: int, sessions: list[int], repeats: int, workdir: Path,
        naive_count: int | None = None) -> dict:
    campaign = data.write_campaign(workdir / "campaign")
    recipients = data.write_list(workdir / "list.csv", count)
    naive_count = naive_count or max(count // 5, 200)
    by_sessions = {}
    with Sink() as sink:
        for c in sessions:
            contenders = _contenders(sink, c, count, naive_count, campaign, recipients, workdir)
            runs = interleaved(repeats, contenders)
            by_sessions[str(c)] = _summarise(runs)
    result = {"count": count, "naive_count": naive_count, "repeats": repeats,
              "by_sessions": by_sessions}
    result["targets"] = _targets(by_sessions.get(str(TARGETS_AT)))
    return result


def _contenders(sink: Sink, c: int, count: int, naive_count: int, campaign: Path,
                recipients: Path, workdir: Path) -> dict[str, Callable[[], dict]]:
    return {
        "mailerd": lambda: run_mailerd(sink, c, count, campaign, recipients, workdir),
        "smtp_source": lambda: run_smtp_source(sink, c, count),
        "prebuilt": lambda: run_client("prebuilt", sink, c, count),
        "prebuilt_uvloop": lambda: run_client("prebuilt", sink, c, count, uvloop=True),
        "ceiling": lambda: run_ceiling(sink, c, count),
        "naive": lambda: run_client("naive", sink, c, naive_count),
    }


# ---------------------------------------------------------------- contenders


def run_mailerd(sink: Sink, c: int, count: int, campaign: Path, recipients: Path,
                workdir: Path, profile: Callable[[Mailerd, list[int]], None] | None = None
                ) -> dict:
    with Mailerd(Path(tempfile.mkdtemp(prefix="mailerd-", dir=workdir)), sink.port, c) as daemon:
        workers = daemon.worker_pids()
        before = daemon.cpu(workers)
        started = time.time()
        campaign_id, enqueue_wall = daemon.enqueue(campaign, recipients)
        if profile is not None:
            profile(daemon, workers)
        daemon.wait_settled(campaign_id, timeout=max(120, count / 100))
        after = daemon.cpu(workers)
        finished = daemon.last_outcome_at(campaign_id)
        sent = daemon.report(campaign_id).counts.sent
    cpu = {key: after[key] - before[key] for key in after}
    total_cpu = cpu["daemon"] + cpu["workers"]
    return {
        "rate": sent / (finished - started), "wall": finished - started, "sent": sent,
        "enqueue_wall": enqueue_wall,
        "cpu_ms_per_msg": 1000 * total_cpu / sent,
        "daemon_cpu_ms_per_msg": 1000 * cpu["daemon"] / sent,
        "workers_cpu_ms_per_msg": 1000 * cpu["workers"] / sent,
        "journal_cpu_ms_per_msg": 1000 * cpu["journal"] / sent,
        "journal_cpu_share": cpu["journal"] / total_cpu if total_cpu else 0.0,
    }


def run_smtp_source(sink: Sink, c: int, count: int) -> dict:
    command = ["smtp-source", "-d", "-s", str(c), "-m", str(count), "-l", "2048",
               "-f", "news@example.org", "-t", "user@example.com", f"127.0.0.1:{sink.port}"]
    return _timed(command, count)


def run_client(kind: str, sink: Sink, c: int, count: int, uvloop: bool = False) -> dict:
    command = [sys.executable, "-m", "bench.clients", kind, "--port", str(sink.port),
               "--sessions", str(c), "--count", str(count)] + (["--uvloop"] if uvloop else [])
    result = _timed(command, count)
    reported = json.loads(result.pop("stdout"))
    result["rate"] = count / reported["wall"]  # the loop itself, without interpreter start-up
    result["cpu_ms_per_msg"] = 1000 * reported["cpu"] / count
    return result


def run_ceiling(sink: Sink, processes: int, count: int) -> dict:
    """`processes` clients of one session each, connected first, then let go together;
    the rate is over the span from the first start to the last end of their loops."""
    share = [count // processes + (i < count % processes) for i in range(processes)]
    clients = [subprocess.Popen(
        [sys.executable, "-m", "bench.clients", "prebuilt", "--port", str(sink.port),
         "--sessions", "1", "--count", str(n), "--uvloop", "--wait-go"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd=Path(__file__).resolve().parent.parent) for n in share]
    try:
        for client in clients:
            if client.stdout is None or client.stdout.readline().strip() != "ready":
                raise RuntimeError("a ceiling client did not get ready")
        for client in clients:
            assert client.stdin is not None
            client.stdin.write("go\n")
            client.stdin.flush()
        loops = []
        for client in clients:
            out, err = client.communicate(timeout=max(300, count / 50))
            if client.returncode != 0:
                raise RuntimeError(f"ceiling client exited {client.returncode}: {err[-500:]}")
            loops.append(json.loads(out)["loop"])
    finally:
        for client in clients:
            if client.poll() is None:
                client.kill()
                client.wait()
    wall = max(loop["end"] for loop in loops) - min(loop["start"] for loop in loops)
    cpu = sum(loop["cpu"] for loop in loops)
    return {"rate": count / wall, "wall": wall, "cpu_ms_per_msg": 1000 * cpu / count}


def _timed(command: list[str], count: int) -> dict:
    before = _children_cpu()
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=max(300, count / 50),
                          cwd=Path(__file__).resolve().parent.parent)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {done.returncode}: {done.stderr[-500:]}")
    cpu = _children_cpu() - before
    return {"rate": count / wall, "wall": wall, "cpu_ms_per_msg": 1000 * cpu / count,
            "stdout": done.stdout}


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# ---------------------------------------------------------------- summary


def _summarise(runs: dict[str, list[dict]]) -> dict:
    summary: dict[str, dict] = {}
    for name, results in runs.items():
        for result in results:
            result.pop("stdout", None)
        keys = [k for k in results[0] if isinstance(results[0][k], (int, float))]
        summary[name] = {"median": {k: median_of(results, k) for k in keys}, "runs": results}
    rate = summary["mailerd"]["median"]["rate"]
    summary["ratios"] = {
        ratio: rate / summary[other]["median"]["rate"] for ratio, other in RATIO_OF.items()
    }
    return summary


def _targets(at: dict | None) -> dict:
    if at is None:
        return {}
    targets = {
        ratio: {"target": target, "measured": at["ratios"][ratio],
                "met": at["ratios"][ratio] >= target, "unit": "×"}
        for ratio, target in TARGETS.items()
    }
    cpu = at["mailerd"]["median"]["cpu_ms_per_msg"]
    targets["cpu_ms_per_msg"] = {"target": CPU_TARGET_MS, "measured": cpu,
                                 "met": cpu <= CPU_TARGET_MS, "at_most": True, "unit": " ms"}
    return targets
