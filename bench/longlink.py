"""Scenario "one session over a long link": what a sender whose relay allows one to a
few sessions feels, at 40 ms round trip.

A delaying TCP proxy on 127.0.0.1 adds 20 ms each way in front of smtp-sink (which
offers PIPELINING). Through it, for C = 1, 2 and 4 sessions, interleaved and repeated:
  mailerd   enqueue -> every recipient sent, journal on, connections = C
  loop      aiosmtplib, C sessions in one process, one prebuilt message, each
            command waiting for its reply (MAIL, RCPT, DATA, ".": four round trips)
  floor     one message per round trip per session: C / RTT
Target: mailerd >= 3.5x the loop at C = 1 (about one round trip a message).
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

from . import data
from .mailerd_proc import Mailerd
from .throughput import run_client
from .tools import Sink, interleaved, median_of, stop_process

ONE_WAY = 0.020  # seconds added in each direction: RTT 40 ms
TARGET_VS_LOOP = 3.5
TARGET_AT = 1


class DelayProxy:
    """A TCP proxy on 127.0.0.1 that delivers every chunk `one_way` seconds after it
    arrived, in order, in both directions: latency without a bandwidth limit, so a
    pipelined client gains what it would on a real long link. It runs in a process of
    its own, so the bench's own work (polling the daemon) never delays a chunk."""

    def __init__(self, target_port: int, one_way: float = ONE_WAY) -> None:
        self.target_port = target_port
        self.one_way = one_way
        self.port = 0
        self.proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> "DelayProxy":
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.longlink", str(self.target_port), str(self.one_way)],
            stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parent.parent)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # the proxy's port, once it listens
        if not line.strip().isdigit():
            self.__exit__()
            raise RuntimeError(f"the delaying proxy did not start: {line!r}")
        self.port = int(line)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            stop_process(self.proc)


async def serve_delayed(target_port: int, one_way: float) -> None:
    """The proxy's process: print the listening port, then serve until SIGTERM."""
    loop = asyncio.get_running_loop()

    async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, chunk = await queue.get()
                await asyncio.sleep(max(0.0, due - loop.time()))
                if not chunk:
                    break
                sink.write(chunk)
                await sink.drain()

        delivery = asyncio.create_task(deliver())
        try:
            while chunk := await source.read(65536):
                queue.put_nowait((loop.time() + one_way, chunk))
        except ConnectionError:
            pass
        queue.put_nowait((loop.time() + one_way, b""))
        try:
            await delivery
        except ConnectionError:
            pass
        sink.close()

    async def session(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", target_port)
        except OSError:
            client_w.close()
            return
        await asyncio.gather(pump(client_r, server_w), pump(server_r, client_w))

    stop = loop.create_future()
    loop.add_signal_handler(signal.SIGTERM, stop.set_result, None)
    server = await asyncio.start_server(session, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    await stop
    server.close()


class _Endpoint(NamedTuple):
    port: int  # what throughput.run_client needs of a Sink


def run(per_session: int, sessions: list[int], repeats: int, workdir: Path,
        loop_per_session: int) -> dict[str, Any]:
    campaign = data.write_campaign(workdir / "campaign")
    by_sessions: dict[str, dict[str, Any]] = {}
    with Sink() as sink, DelayProxy(sink.port) as proxy:
        endpoint: Any = _Endpoint(proxy.port)
        for c in sessions:
            count = per_session * c
            recipients = data.write_list(workdir / f"list{c}.csv", count)
            contenders: dict[str, Callable[[], dict]] = {
                "mailerd": lambda: run_mailerd(proxy.port, c, count, campaign, recipients, workdir),
                "loop": lambda: run_client("prebuilt", endpoint, c, loop_per_session * c),
            }
            by_sessions[str(c)] = _summarise(interleaved(repeats, contenders), c)
    at = by_sessions.get(str(TARGET_AT))
    targets = {} if at is None else {"vs_loop": {
        "target": TARGET_VS_LOOP, "measured": at["ratios"]["vs_loop"],
        "met": at["ratios"]["vs_loop"] >= TARGET_VS_LOOP}}
    return {"per_session": per_session, "loop_per_session": loop_per_session, "repeats": repeats,
            "rtt_ms": 2000 * ONE_WAY, "by_sessions": by_sessions, "targets": targets}


def run_mailerd(port: int, c: int, count: int, campaign: Path, recipients: Path,
                workdir: Path) -> dict[str, float]:
    """`rate`: from the enqueue to the last message sent; `session_rate`: from the first
    message sent to the last, the sessions' own pace (enqueue and connect left out)."""
    with Mailerd(Path(tempfile.mkdtemp(prefix="mailerd-", dir=workdir)), port, c) as daemon:
        started = time.time()
        campaign_id, _ = daemon.enqueue(campaign, recipients)
        daemon.wait_settled(campaign_id, timeout=max(120, count / 5))  # the times come from the journal
        first = daemon.first_sent_after(campaign_id, 0) or started
        last = daemon.last_outcome_at(campaign_id)
        sent = daemon.report(campaign_id).counts.sent
    return {"rate": sent / (last - started), "session_rate": (sent - 1) / max(last - first, 1e-6),
            "sent": sent}


def _summarise(runs: dict[str, list[dict]], sessions: int) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for name, results in runs.items():
        for result in results:
            result.pop("stdout", None)
        summary[name] = {"rate": median_of(results, "rate"),
                         "rates": [round(r["rate"], 2) for r in results]}
    summary["mailerd"]["session_rate"] = median_of(runs["mailerd"], "session_rate")
    floor = sessions / (2 * ONE_WAY)
    summary["floor"] = {"rate": floor}
    mailerd = summary["mailerd"]["rate"]
    summary["ratios"] = {"vs_loop": mailerd / summary["loop"]["rate"], "vs_floor": mailerd / floor}
    return summary


def markdown(result: dict[str, Any]) -> str:
    out = [f"### One session over a long link: RTT {result['rtt_ms']:g} ms (delaying proxy in "
           f"front of smtp-sink), {result['per_session']} messages a session for mailerd, "
           f"{result['loop_per_session']} for the loop; median of {result['repeats']}", "",
           "| sessions | mailerd msg/s | (first to last sent) | aiosmtplib loop msg/s "
           "| RTT floor msg/s | mailerd ÷ loop | mailerd ÷ floor |",
           "|---:|---:|---:|---:|---:|---:|---:|"]
    for sessions, at in result["by_sessions"].items():
        out.append(f"| {sessions} | {at['mailerd']['rate']:.1f} | {at['mailerd']['session_rate']:.1f} "
                   f"| {at['loop']['rate']:.1f} "
                   f"| {at['floor']['rate']:.1f} | {at['ratios']['vs_loop']:.2f}x "
                   f"| {at['ratios']['vs_floor']:.2f}x |")
    for name, target in result["targets"].items():
        out += ["", f"Target {name} >= {target['target']}x at C = {TARGET_AT}: "
                    f"{target['measured']:.2f}x, {'met' if target['met'] else 'missed'}"]
    return "\n".join(out)


if __name__ == "__main__":  # the proxy's process: python -m bench.longlink TARGET_PORT ONE_WAY
    asyncio.run(serve_delayed(int(sys.argv[1]), float(sys.argv[2])))
