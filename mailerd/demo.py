"""`python -m mailerd.demo`: see mailerd work against a relay that drops connections.

Starts a fake relay on 127.0.0.1 that closes the session after every 7 messages,
runs mailerd on ./demo-run with nothing but that relay configured, enqueues a
1,000-recipient campaign with mailerctl, watches it to the end, prints the report
and what the relay received, and stops everything.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

from mailerd.testing.relay import Faults, FakeRelay
from mailerd.testing.waiting import wait_until

CAMPAIGN = """\
name = "Demo letter"
from = "Demo News <news@example.org>"
subject = "Hello {{ first_name }}, your November letter"
text = "body.txt"
html = "body.html"
"""
TEXT = "Dear {{ first_name }} {{ last_name }},\n\nthis is the November letter.\n"
HTML = "<p>Dear <b>{{ first_name }}</b> {{ last_name }},</p>\n<p>this is the November letter.</p>\n"


def write_files(run_dir: Path, count: int, port: int) -> tuple[Path, Path, Path]:
    run_dir.mkdir(parents=True, exist_ok=True)
    config = run_dir / "mailerd.toml"
    config.write_text(
        f'[daemon]\nstate_dir = "{run_dir / "state"}"\n\n'
        f'[servers.local]\nhost = "127.0.0.1"\nport = {port}\nconnections = 4\n'
    )
    (run_dir / "body.txt").write_text(TEXT)
    (run_dir / "body.html").write_text(HTML)
    campaign = run_dir / "campaign.toml"
    campaign.write_text(CAMPAIGN)
    recipients = run_dir / "list.csv"
    with recipients.open("w") as out:
        out.write("email,first_name,last_name\n")
        for i in range(count):
            out.write(f"reader{i}@example.com,Reader{i},Demo\n")
    return config, campaign, recipients


def mailerctl(socket: Path, *args: str, capture: bool = False) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "mailerctl", "--socket", str(socket), *args],
        check=True, text=True, stdout=subprocess.PIPE if capture else None,
    )
    return result.stdout or ""


def wait_for_socket(socket: Path, daemon: subprocess.Popen[bytes]) -> None:
    def opened() -> bool:
        if socket.exists():
            return True
        if daemon.poll() is not None:
            raise SystemExit(f"mailerd exited with {daemon.returncode}")
        return False

    wait_until(opened, 20, "mailerd to open its control socket", error=SystemExit)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipients", type=int, default=1000)
    parser.add_argument("--drop-after", type=int, default=7)
    parser.add_argument("--dir", default="demo-run")
    args = parser.parse_args()
    run_dir = Path(args.dir).resolve()
    if (run_dir / "state").exists():
        subprocess.run(["rm", "-rf", str(run_dir / "state")], check=True)

    with FakeRelay(Faults(drop_after=args.drop_after)) as relay:
        config, campaign, recipients = write_files(run_dir, args.recipients, relay.port)
        print(f"fake relay on 127.0.0.1:{relay.port}, dropping the session every "
              f"{args.drop_after} messages")
        log = open(run_dir / "mailerd.log", "wb")
        daemon = subprocess.Popen([sys.executable, "-m", "mailerd", "--config", str(config)],
                                  stdout=log, stderr=log)
        socket = run_dir / "state" / "control.sock"
        try:
            wait_for_socket(socket, daemon)
            campaign_id = mailerctl(socket, "enqueue", str(campaign), "--recipients",
                                    str(recipients), capture=True).strip()
            print(f"enqueued campaign {campaign_id} ({args.recipients} recipients)")
            mailerctl(socket, "watch", campaign_id)
            mailerctl(socket, "report", campaign_id)
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(30)
            log.close()
        counts = relay.count_by_rcpt()
        twice = sum(1 for n in counts.values() if n > 1)
        print(f"\nrelay: {sum(counts.values())} messages to {len(counts)} distinct recipients, "
              f"{twice} received more than once, {relay.drops} connections dropped by the relay")
        print(f"daemon log: {run_dir / 'mailerd.log'}")
    if twice or len(counts) != args.recipients:
        sys.exit(1)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
