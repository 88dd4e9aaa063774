"""Issue 15's frictions a new user meets, outside systemd (test_systemd.py has the unit's):
special-use domains a relay serves, `--check-config` that reads every file the daemon
will read, `mailerd --reload PID` that reports the daemon's verdict, `mailerctl watch`
across a daemon restart, `--version`, shell completion and man pages from --help."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_campaign, relay_server, wait_until
from mailerd import __version__
from mailerd.testing.daemon import write_config
from mailerd.testing.relay import Faults

ROOT = Path(__file__).resolve().parent.parent


def mailerd(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k != "CREDENTIALS_DIRECTORY"}
    return subprocess.run([sys.executable, "-m", "mailerd", *args], capture_output=True,
                          text=True, timeout=60, env={**environment, **(env or {})})


# ---------------------------------------------------------------- special-use domains


def test_addresses_on_allowed_special_use_domains_are_sent(daemon_factory, relay_factory,
                                                            tmp_path):
    relay = relay_factory()
    daemon = daemon_factory({"relay": relay_server(relay)},
                            delivery={"allow_special_use_domains": ["local"]}).start()
    extra = [f"other{i}@lab.test,Other{i},T{i}" for i in range(3)]  # "test" is not allowed
    cid = daemon.send_campaign(tmp_path / "c", 5, domain="intranet.local", extra_rows=extra)
    report = daemon.wait_done(cid)
    assert report.counts.sent == 5 and report.counts.invalid == 3
    assert sorted(r.rcpt for r in relay.received) == sorted(
        f"user{i}@intranet.local" for i in range(5))
    invalid = daemon.report(cid, "invalid").recipients
    assert all("special-use" in r.reply for r in invalid), [r.reply for r in invalid]


def test_a_name_that_is_not_special_use_is_a_config_error(tmp_path):
    config = write_config(tmp_path / "m.toml",
                          {"delivery": {"allow_special_use_domains": ["local", "com"]}})
    result = mailerd("--config", str(config), "--check-config")
    assert result.returncode == 2
    assert "key delivery.allow_special_use_domains: 'com' is not a special-use domain" \
        in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------- --check-config


def server_with(**keys: str) -> dict[str, dict[str, str]]:
    return {"servers.isp": {"host": "127.0.0.1", "port": 2525, "security": "tls", **keys}}


def test_check_config_reads_the_password_file(tmp_path):
    config = write_config(tmp_path / "m.toml", server_with(
        username="me", password_file=str(tmp_path / "missing")))
    result = mailerd("--config", str(config), "--check-config")
    assert result.returncode == 2, result.stdout
    assert f"servers.isp.password_file: cannot read {tmp_path / 'missing'}" in result.stderr

    (tmp_path / "missing").write_text("secret\n")
    assert mailerd("--config", str(config), "--check-config").returncode == 0


def test_check_config_reads_the_dkim_key(tmp_path):
    (tmp_path / "dkim.key").write_text("not a key\n")
    config = write_config(tmp_path / "m.toml", server_with(
        dkim_domain="example.org", dkim_selector="s1", dkim_key_file=str(tmp_path / "dkim.key")))
    result = mailerd("--config", str(config), "--check-config")
    assert result.returncode == 2 and "servers.isp.dkim_key_file" in result.stderr, result.stderr


def test_check_config_says_what_it_cannot_check_outside_the_service(tmp_path):
    config = write_config(tmp_path / "m.toml", server_with(
        username="me", password_file="$CREDENTIALS_DIRECTORY/relay_isp"))
    result = mailerd("--config", str(config), "--check-config")
    assert result.returncode == 0
    assert "servers.isp.password_file: not checked: $CREDENTIALS_DIRECTORY" in result.stdout
    credentials = tmp_path / "creds"
    credentials.mkdir()
    inside = mailerd("--config", str(config), "--check-config",
                     env={"CREDENTIALS_DIRECTORY": str(credentials)})
    assert inside.returncode == 2 and "relay_isp" in inside.stderr  # inside the unit: read


# ---------------------------------------------------------------- reload


def test_reload_reports_the_daemons_verdict(daemon_factory, relay_factory, tmp_path):
    relay = relay_factory()
    password = tmp_path / "password"
    password.write_text("secret\n")
    daemon = daemon_factory({"relay": relay_server(relay, connections=2)}).start()
    good = daemon.config.read_text()
    bad = good + (f'\n[servers.auth]\nhost = "127.0.0.1"\nport = 1\nsecurity = "tls"\n'
                  f'username = "me"\npassword_file = "{tmp_path / "nowhere"}"\n')
    daemon.config.write_text(bad)
    refused = mailerd("--config", str(daemon.config), "--reload", str(daemon.pid))
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert f"cannot read {tmp_path / 'nowhere'}" in refused.stderr
    assert "keeps the previous config" in refused.stderr
    assert [s.name for s in daemon.status().servers] == ["relay"]  # nothing changed

    daemon.config.write_text(bad.replace(str(tmp_path / "nowhere"), str(password)))
    applied = mailerd("--config", str(daemon.config), "--reload", str(daemon.pid))
    assert applied.returncode == 0, applied.stderr
    assert sorted(s.name for s in daemon.status().servers) == ["auth", "relay"]


# ---------------------------------------------------------------- watch


def test_watch_waits_through_a_daemon_restart(daemon_factory, relay_factory, tmp_path):
    relay = relay_factory(Faults(reply_delay=0.02))
    daemon = daemon_factory({"relay": relay_server(relay)}).start()
    cid = daemon.send_campaign(tmp_path / "c", 300)
    shown = tmp_path / "watch.out"
    with open(shown, "w") as sink:
        watch = subprocess.Popen(
            [sys.executable, "-m", "mailerctl", "--socket", daemon.socket, "watch", str(cid),
             "--interval", "0.1"], stdout=sink, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: "running" in shown.read_text(), 20, "watch to show the campaign")
        daemon.kill_group()  # no socket unit here: calls are refused until it is back
        daemon.start()
        _, err = watch.communicate(timeout=120)
    finally:
        if watch.poll() is None:
            watch.send_signal(signal.SIGKILL)
            watch.wait()
    assert watch.returncode == 0, err
    assert "waiting for mailerd to come back" in err
    last = shown.read_text().strip().splitlines()[-1]
    assert last.endswith("done") and "queued 0 " in last, last


def test_watch_gives_up_after_its_reconnect_timeout(tmp_path):
    missing = tmp_path / "control.sock"
    result = subprocess.run([sys.executable, "-m", "mailerctl", "--socket", str(missing), "watch",
                             "1", "--interval", "0.05", "--reconnect-timeout", "0.3"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 3 and "is mailerd running?" in result.stderr, result.stderr


# ---------------------------------------------------------------- version


@pytest.mark.parametrize("module", ["mailerd", "mailerctl"])
def test_version(module):
    result = subprocess.run([sys.executable, "-m", module, "--version"], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0 and result.stdout.strip() == f"{module} {__version__}"


# ---------------------------------------------------------------- man pages, completion

GEN_DOCS = ROOT / "packaging" / "gen-docs.py"


def test_man_pages_and_completion_in_packaging_are_current():
    """They are generated from the parsers: a new option shows in both or the suite fails."""
    result = subprocess.run([sys.executable, str(GEN_DOCS), "--check"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_generated_pages_follow_the_parsers(tmp_path):
    subprocess.run([sys.executable, str(GEN_DOCS), str(tmp_path)], check=True, timeout=60)
    page = (tmp_path / "man" / "mailerctl.1").read_text()
    ctl_help = subprocess.run([sys.executable, "-m", "mailerctl", "watch", "--help"],
                              capture_output=True, text=True, timeout=30).stdout
    assert "--reconnect-timeout" in ctl_help and "\\-\\-reconnect\\-timeout" in page
    assert '.SS "mailerctl settle' in page and "debug\\-freeze" not in page  # hidden stays hidden
    assert "\\-\\-reload" in (tmp_path / "man" / "mailerd.8").read_text()


@pytest.mark.skipif(shutil.which("man") is None, reason="man is not installed")
@pytest.mark.parametrize("page", ["mailerd.8", "mailerctl.1"])
def test_man_pages_render_without_warnings(page):
    result = subprocess.run(["man", "--warnings", "-l", str(ROOT / "packaging" / "man" / page)],
                            capture_output=True, text=True, timeout=60,
                            env={**os.environ, "MANWIDTH": "80", "MANPAGER": "cat"})
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr
    assert "SYNOPSIS" in result.stdout


def bash_complete(line: str) -> list[str]:
    """What bash offers for `line` with packaging/completion/mailerctl.bash loaded."""
    words = line.split(" ")
    script = (f"source {ROOT / 'packaging' / 'completion' / 'mailerctl.bash'}\n"
              f"COMP_WORDS=({' '.join(repr(w) for w in words)}); COMP_CWORD={len(words) - 1}\n"
              "_mailerctl; printf '%s\\n' \"${COMPREPLY[@]}\"\n")
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_bash_completion_offers_commands_options_and_choices():
    assert {"enqueue", "settle", "watch", "--socket", "--version"} <= set(bash_complete("mailerctl "))
    assert "debug-freeze" not in bash_complete("mailerctl ")
    assert bash_complete("mailerctl se") == ["set", "settle"]
    assert "--reconnect-timeout" in bash_complete("mailerctl watch --")
    assert bash_complete("mailerctl --socket /tmp/s settle 1 --as ") == ["sent", "resend"]
    assert "uncertain" in bash_complete("mailerctl report 1 --state ")


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is not installed")
def test_zsh_completion_parses():
    result = subprocess.run(["zsh", "-n", str(ROOT / "packaging" / "completion" / "_mailerctl")],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------- uncertain after a crash


def test_each_recipient_made_uncertain_by_a_crash_gets_a_log_entry(daemon_factory, relay_factory,
                                                                   tmp_path):
    relay = relay_factory(Faults(reply_delay=30))  # every "." waits: data-sent when killed
    daemon = daemon_factory({"relay": relay_server(relay, connections=2)}).start()
    cid = daemon.send_campaign(tmp_path / "c", 10)
    wait_until(lambda: len(relay.received) >= 2, 20, "two messages past their final dot")
    daemon.kill_group()
    relay.set_faults(Faults())
    daemon.start()
    uncertain = daemon.emails(cid, "uncertain")
    assert uncertain and uncertain <= {r.rcpt for r in relay.received}
    for email in uncertain:
        line = daemon.log_line(" uncertain ", f"recipient={email}")
        assert f"campaign={cid}" in line and "server=relay" in line, line
    logged = [line for line in daemon.log().splitlines() if " uncertain campaign=" in line]
    assert len(logged) == len(uncertain), logged
