"""py-spy profiles of the daemon and one worker during an end-to-end run.

`python -m bench --profile DIR` records both (collapsed stacks, `--format raw`) during
one mailerd run at C=16 and prints the functions with the largest share of samples,
inclusive and self. Needs `pip install py-spy` and ptrace rights (root).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

from .mailerd_proc import Mailerd
from .throughput import run_mailerd
from .tools import Sink
from . import data


def record(sink: Sink, sessions: int, count: int, out_dir: Path, duration: int = 8) -> dict:
    if not shutil.which("py-spy"):
        raise RuntimeError("py-spy is not installed (pip install py-spy)")
    out_dir.mkdir(parents=True, exist_ok=True)
    campaign = data.write_campaign(out_dir / "campaign")
    recipients = data.write_list(out_dir / "list.csv", count)
    spies: list[subprocess.Popen[bytes]] = []

    def start_spies(daemon: Mailerd, workers: list[int]) -> None:
        for name, pid in (("daemon", daemon.pid), ("worker", workers[0])):
            spies.append(subprocess.Popen(
                ["py-spy", "record", "--pid", str(pid), "--duration", str(duration),
                 "--rate", "250", "--format", "raw", "--nonblocking", "--threads",
                 "-o", str(out_dir / f"{name}.txt")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

    workdir = Path(tempfile.mkdtemp(prefix="profile-", dir=out_dir))
    result = run_mailerd(sink, sessions, count, campaign, recipients, workdir,
                         profile=start_spies)
    for spy in spies:
        spy.wait(60)
    return {
        "run": result,
        "daemon": summarise(out_dir / "daemon.txt"),
        "worker": summarise(out_dir / "worker.txt"),
    }


def summarise(path: Path, top: int = 25) -> dict:
    """Shares of samples per function: inclusive (anywhere on the stack) and self (leaf)."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_short(frame) for frame in stack.split(";")]
        total += count
        for frame in set(frames):
            inclusive[frame] += count
        own[frames[-1]] += count
    share = lambda counter: [(f, round(100 * n / total, 1)) for f, n in counter.most_common(top)]
    return {"samples": total, "inclusive": share(inclusive), "self": share(own)}


def _short(frame: str) -> str:
    """`func (/long/path/mailerd/worker.py:123)` -> `func (mailerd/worker.py:123)`."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    parts = where.split("/")
    return f"{name} ({'/'.join(parts[-2:])})" if where else name


def print_summary(profile: dict) -> None:
    for who in ("daemon", "worker"):
        summary = profile[who]
        print(f"\n{who}: {summary['samples']} samples")
        print("  inclusive:")
        for frame, pct in summary["inclusive"][:20]:
            print(f"    {pct:5.1f}%  {frame}")
        print("  self:")
        for frame, pct in summary["self"][:20]:
            print(f"    {pct:5.1f}%  {frame}")
