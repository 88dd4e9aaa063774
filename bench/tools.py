"""Shared plumbing: Postfix's test tools, the sink, /proc readings, medians."""

from __future__ import annotations

import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterator

from mailerd.testing.ports import free_port
from mailerd.testing.waiting import wait_until

CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchUnavailable(Exception):
    """A tool the benchmarks need cannot be had on this machine."""


# ---------------------------------------------------------------- Postfix tools


def ensure_smtp_tools() -> None:
    """Install Debian's postfix for smtp-sink/smtp-source, with no daemon left running."""
    if not (shutil.which("smtp-sink") and shutil.which("smtp-source")):
        _install_postfix()
    stop_postfix_daemon()
    if not (shutil.which("smtp-sink") and shutil.which("smtp-source")):
        raise BenchUnavailable("smtp-sink/smtp-source not found after installing postfix")


def _install_postfix() -> None:
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise BenchUnavailable("smtp-sink is missing and apt-get cannot be run as root here")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    steps = [
        ["sh", "-c", 'echo "postfix postfix/main_mailer_type select No configuration"'
                     " | debconf-set-selections"],
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "postfix"],
    ]
    for step in steps:
        result = subprocess.run(step, env=env, capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            raise BenchUnavailable(f"{' '.join(step)} failed: {result.stderr.strip()[-400:]}")


def stop_postfix_daemon() -> None:
    """The package may start Postfix's master; the benchmarks want none."""
    if not _postfix_master_running():
        return
    for command in (["postfix", "stop"], ["systemctl", "stop", "postfix"]):
        if shutil.which(command[0]):
            subprocess.run(command, capture_output=True, timeout=60)
        if not _postfix_master_running():
            return
    raise BenchUnavailable("a Postfix master process is still running; stop it first")


def _postfix_master_running() -> bool:
    """The system instance's master (its pid file), not the private instances tests start."""
    try:
        pid = int(Path("/var/spool/postfix/pid/master.pid").read_text().split()[0])
        os.kill(pid, 0)
    except (OSError, ValueError, IndexError):
        return False
    return True


class Sink:
    """smtp-sink on 127.0.0.1: answers every command with success, keeps nothing."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> "Sink":
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        self.proc = subprocess.Popen(
            ["smtp-sink", *user, f"127.0.0.1:{self.port}", "1024"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for(self._listening, 10, "smtp-sink to listen")
        return self

    def _listening(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return True
        except OSError:
            return False

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            stop_process(self.proc)

    def cpu(self) -> float:
        return proc_cpu(self.proc.pid) if self.proc else 0.0


# ---------------------------------------------------------------- /proc readings


def proc_cpu(pid: int) -> float:
    """utime + stime of a process in seconds (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of a process's threads, summed per thread name (comm)."""
    totals: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            comm = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        totals[comm] = totals.get(comm, 0.0) + (int(fields[11]) + int(fields[12])) / CLK_TCK
    return totals


def pss_bytes(pid: int) -> int:
    """Proportional set size from /proc/PID/smaps_rollup (0 if the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def steal_fraction(seconds: float = 1.0) -> float:
    """Share of CPU time stolen by the hypervisor over a short sample."""
    def sample() -> tuple[int, int]:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return values[7] if len(values) > 7 else 0, sum(values)
    steal0, total0 = sample()
    time.sleep(seconds)
    steal1, total1 = sample()
    return (steal1 - steal0) / max(total1 - total0, 1)


# ---------------------------------------------------------------- helpers


def wait_for(predicate: Callable[[], object], timeout: float, what: str,
             interval: float = 0.02) -> object:
    return wait_until(predicate, timeout, what, interval, error=TimeoutError)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def interleaved(repeats: int, contenders: dict[str, Callable[[], dict]]) -> dict[str, list[dict]]:
    """Run each contender `repeats` times, round-robin, so drift hits all alike."""
    results: dict[str, list[dict]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, run in contenders.items():
            results[name].append(run())
    return results


def median_of(runs: list[dict], key: str) -> float:
    return median([run[key] for run in runs if key in run])


def machine_info() -> dict[str, object]:
    import aiosmtplib
    import msgspec
    import sqlite3

    cpu_model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu_model = line.split(":", 1)[1].strip()
            break
    info: dict[str, object] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "aiosmtplib": aiosmtplib.__version__,
        "msgspec": msgspec.__version__,
        "postfix": _postfix_version(),
        "uvloop": _uvloop_version(),
        "steal_at_start": round(steal_fraction(), 3),
        "mailerd_commit": _git_commit(),
    }
    return info


def _git_commit() -> str:
    result = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                            text=True, cwd=Path(__file__).resolve().parent.parent)
    return result.stdout.strip() or "unknown"


def _postfix_version() -> str:
    result = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "postfix"],
                            capture_output=True, text=True)
    return result.stdout.strip() or "unknown"


def _uvloop_version() -> str | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.__version__


def process_tree(root: int) -> Iterator[int]:
    """root and its descendants (children first found via /proc/*/stat ppid)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    stack = [root]
    while stack:
        pid = stack.pop()
        yield pid
        stack.extend(children.get(pid, []))


def stop_process(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL if it has not gone within 5 s."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
