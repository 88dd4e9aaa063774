"""Issue 15's frictions a new user meets, outside systemd (test_systemd.py has the unit's):
special-use domains a relay serves (and `mailerctl preview --config` that accepts them as
the daemon does), `--check-config` that reads every file the daemon will read,
`mailerd --reload PID` that reports the daemon's verdict, `mailerctl watch` across a
daemon restart, `--version`, shell completion and man pages from --help, and a journal
entry for each uncertain recipient, after a crash or a worker's death."""

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
from test_notify_and_logging import journal_stand_in, needs_journal_stand_in, parse_native

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


def mailerctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mailerctl", *args], capture_output=True,
                          text=True, timeout=60)


def test_preview_agrees_with_the_daemon_given_its_config(daemon_factory, relay_factory, tmp_path):
    relay = relay_factory()
    daemon = daemon_factory({"relay": relay_server(relay)},
                            delivery={"allow_special_use_domains": ["local"]}).start()
    campaign, recipients = make_campaign(tmp_path / "c", 2, domain="printer.local")
    report = daemon.wait_done(daemon.enqueue(campaign, recipients))
    assert (report.counts.sent, report.counts.invalid) == (2, 0)  # the daemon takes them

    preview = ("preview", str(campaign), "--recipients", str(recipients), "--row", "2")
    shown = mailerctl(*preview, "--config", str(daemon.config))
    assert shown.returncode == 0, shown.stderr
    assert "To: user1@printer.local" in shown.stdout and "Dear Name1," in shown.stdout

    alone = mailerctl(*preview)  # without the daemon's config: refused, and told why
    assert alone.returncode == 2 and "Traceback" not in alone.stderr
    assert alone.stderr.startswith(f"mailerctl: {recipients}: line 3: ") and "special-use" \
        in alone.stderr, alone.stderr
    assert "allow_special_use_domains names 'local'" in alone.stderr and "--config" in alone.stderr


def test_test_send_leaves_special_use_names_to_the_daemon(daemon_factory, relay_factory,
                                                          tmp_path):
    """`test-send` goes through the daemon, which checks the campaign with its own setting:
    mailerctl must not refuse a reply_to on a domain the daemon allows."""
    relay = relay_factory()
    daemon = daemon_factory({"relay": relay_server(relay)},
                            delivery={"allow_special_use_domains": ["local"]}).start()
    campaign, _ = make_campaign(tmp_path / "c", 1)
    campaign.write_text(campaign.read_text() + 'reply_to = "desk@office.local"\n')
    sent = daemon.ctl("test-send", str(campaign), "--to", "me@printer.local",
                      "--fields", "first_name=Ann", "code=1", check=False)
    assert sent.returncode == 0, sent.stderr
    assert [m.rcpt for m in relay.received] == ["me@printer.local"]

    campaign.write_text(campaign.read_text().replace("office.local", "lab.test"))
    refused = daemon.ctl("test-send", str(campaign), "--to", "me@printer.local",
                         "--fields", "first_name=Ann", "code=1", check=False)
    assert refused.returncode in (1, 2) and "Traceback" not in refused.stderr
    assert "reply_to" in refused.stderr and "lab.test" in refused.stderr, refused.stderr
    assert len(relay.received) == 1


def test_preview_with_a_config_that_does_not_allow_the_domain_refuses_it(tmp_path):
    campaign, recipients = make_campaign(tmp_path / "c", 1, domain="lab.test")
    preview = ("preview", str(campaign), "--recipients", str(recipients))
    only_local = write_config(tmp_path / "local.toml",
                              {"delivery": {"allow_special_use_domains": ["local"]}})
    refused = mailerctl(*preview, "--config", str(only_local))
    assert refused.returncode == 2 and "special-use" in refused.stderr
    assert "--config" not in refused.stderr  # given: the daemon would refuse it too

    bad = write_config(tmp_path / "bad.toml", {"delivery": {"allow_special_use_domains": ["com"]}})
    result = mailerctl(*preview, "--config", str(bad))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{bad}: [delivery]:" in result.stderr and "'com' is not a special-use domain" \
        in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1

    missing = mailerctl(*preview, "--config", str(tmp_path / "nowhere.toml"))
    assert missing.returncode == 2
    assert missing.stderr.strip() == (f"mailerctl: {tmp_path / 'nowhere.toml'}: cannot read "
                                      "config: No such file or directory")


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


@needs_journal_stand_in
def test_a_recipient_left_uncertain_by_a_dead_worker_gets_a_journal_entry(
        daemon_factory, relay_factory, tmp_path):
    """As after a restart: SIGKILL of a worker (not the daemon) waiting for the reply after
    its "." leaves that recipient uncertain, with an entry of its own in the journal."""
    stand_in = journal_stand_in(tmp_path)
    relay = relay_factory(Faults(reply_delay=60))  # the reply after the "." is held
    daemon = daemon_factory({"relay": relay_server(relay, connections=1)},
                            **stand_in.daemon_options)
    try:
        daemon.start()
        cid = daemon.send_campaign(tmp_path / "c", 3)
        first = wait_until(lambda: relay.received and relay.received[0].rcpt, 20,
                           "a message past its final dot")
        relay.set_faults(Faults())  # the next ones are answered at once
        [worker] = daemon.worker_pids()
        os.kill(worker, signal.SIGKILL)
        report = daemon.wait_done(cid)
        assert (report.counts.sent, report.counts.uncertain) == (2, 1)
        assert daemon.emails(cid, "uncertain") == {first}
        daemon.terminate()
        entries = stand_in.sink.wait_for(
            lambda messages: (e := [parse_native(m) for _, m in messages])
            and any(x.get("MAILERD_EVENT") == "daemon_stopped" for x in e) and e,
            20, "the daemon_stopped entry")
    finally:
        daemon.cleanup()
        stand_in.sink.close()
        stand_in.stderr.close()
        stand_in.daemon_options["stderr"].close()
    uncertain = [e for e in entries if e["MAILERD_EVENT"] == "uncertain"]
    assert len(uncertain) == 1, uncertain
    entry = uncertain[0]
    assert (entry["MAILERD_CAMPAIGN"], entry["MAILERD_RECIPIENT"], entry["MAILERD_SERVER"]) == (
        str(cid), first, "relay")
    assert "worker process died after the final '.'" in entry["MAILERD_REASON"]
    assert entry["PRIORITY"] == "4"
    settled = [e for e in entries if e["MAILERD_EVENT"] == "worker_jobs_settled"]
    assert [e["MAILERD_UNCERTAIN"] for e in settled] == ["1"]
