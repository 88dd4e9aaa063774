"""The Debian package, installed as an administrator would, under a real systemd.

`bash packaging/build-deb.sh` builds the package twice per session (the checkout's
version, then a higher one for the upgrade; the wheels are cached in build/deb-cache).
A systemd booted in namespaces by nsboot.py, with /usr, /opt, /var/log and /var/cache
as overlays besides nsboot's /etc and /var/lib (dpkg writes there; the host never
changes), then lives the README's install story: `apt-get install ./mailerd_*.deb`
(enabled, not started while the config names only the example relay), edit the config,
`systemctl start mailerd`, `mailerctl status` as root and as a member of group mailerd,
a campaign to the test relay, `journalctl -u mailerd` fields, an upgrade to the rebuilt
package in the middle of a second campaign (the journal and the campaign survive, nobody
twice, the edited config untouched), removal (the journal stays) and purge (it goes).

The daemon runs from the package's own venv in /opt/mailerd; only the test relay runs
from this checkout's interpreter.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

import nsboot
from conftest import (assert_nobody_lost_or_sent_twice, campaign_addresses, make_campaign,
                      wait_until)

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "packaging" / "build-deb.sh"
RELAY_PORT = 2525
FIRST_COUNT = 40
UPGRADE_COUNT = 1500
UPGRADE_SUFFIX = "+upgradetest1"
# dpkg and apt write under these besides /etc and /var/lib
EXTRA_OVERLAYS = ("/usr", "/opt", "/var/log", "/var/cache")


def _unavailable() -> str | None:
    if os.environ.get("MAILERD_SKIP_SYSTEMD_TESTS"):
        return "MAILERD_SKIP_SYSTEMD_TESTS is set"
    reason = nsboot.unavailable()
    if reason is None and not Path("/usr/bin/dpkg-deb").exists():
        reason = "dpkg-deb is not installed (apt-get install dpkg)"
    return reason


_reason = _unavailable()
needs_nsboot = pytest.mark.skipif(_reason is not None, reason=f"package test skipped: {_reason}")
RELAY_NAMED = ROOT / "packaging" / "deb" / "relay-named"

CONFIG = f"""\
# edited by the administrator (test_deb.py)
[daemon]
socket_group = "mailerd"
shutdown_timeout = "10s"

[delivery]
retry_initial = "1s"
retry_max = "2s"
reconnect_initial = "0.2s"
reconnect_max = "1s"

[servers.relay]
host = "127.0.0.1"
port = {RELAY_PORT}
security = "none"
connections = 3
timeout = "5s"
"""


def build(output: Path, version: str | None = None) -> Path:
    argv = ["bash", str(BUILD), "--output", str(output)]
    if version is not None:
        argv += ["--version", version]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"build-deb.sh failed:\n{done.stdout}\n{done.stderr[-4000:]}"
    return Path(done.stdout.strip().splitlines()[-1])


def project_version() -> str:
    import tomllib
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


@pytest.fixture(scope="session")
def packages(tmp_path_factory) -> tuple[Path, Path]:
    """The package of this checkout and a rebuilt one with a higher version."""
    out = tmp_path_factory.mktemp("debs")
    out.chmod(0o755)
    first = build(out)
    second = build(out, project_version() + UPGRADE_SUFFIX)
    return first, second


def lock_host_dpkg(deadline: float) -> list[int]:
    """Hold the host's dpkg locks (as apt does: fcntl on lock-frontend, then lock)."""
    fds = []
    for name in ("lock-frontend", "lock"):
        fd = os.open(f"/var/lib/dpkg/{name}", os.O_RDWR | os.O_CREAT, 0o640)
        fds.append(fd)
        while True:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError("the host's dpkg stayed locked (an apt run?) for 3 minutes")
                time.sleep(0.2)  # another process's apt run: nothing to wait on but the lock
    return fds


def private_dpkg_database(ns: nsboot.SystemdNamespace) -> None:
    """A consistent copy of the host's dpkg database, hiding the host's own (an opaque
    overlay directory): apt runs on the host while the test runs would otherwise change
    the lower layer under dpkg ("Stale file handle")."""
    upper = ns.overlays["/var/lib"][0] / "dpkg"
    fds = lock_host_dpkg(time.monotonic() + 180)
    try:
        shutil.copytree("/var/lib/dpkg", upper, symlinks=True)
    finally:
        for fd in fds:
            os.close(fd)
    os.setxattr(upper, "trusted.overlay.opaque", b"y")


@pytest.fixture
def system(tmp_path, packages):
    host = tmp_path / "host"
    host.mkdir(mode=0o755)
    for deb in packages:
        (host / deb.name).write_bytes(deb.read_bytes())
    relay_paths = sorted({Path(sys.prefix), Path(sys.base_prefix), ROOT})
    ns = nsboot.SystemdNamespace(tmp_path / "ns", host, binds=relay_paths)
    for inside in EXTRA_OVERLAYS:
        name = inside.strip("/").replace("/", "-")
        upper, work = tmp_path / "ns" / f"{name}-upper", tmp_path / "ns" / f"{name}-work"
        upper.mkdir(parents=True)
        work.mkdir(parents=True)
        ns.overlays[inside] = (upper, work)
    private_dpkg_database(ns)
    with nsboot.booted(ns, 120):
        yield ns


def apt(ns: nsboot.SystemdNamespace, *args: str) -> str:
    done = ns.run(["apt-get", "-y", "-q", *args], timeout=300,
                  env={"DEBIAN_FRONTEND": "noninteractive"})
    return done.stdout + done.stderr


def ctl(ns: nsboot.SystemdNamespace, *args: str, user: str | None = None,
        check: bool = True) -> subprocess.CompletedProcess[str]:
    """The packaged mailerctl, found on PATH with its default socket."""
    prefix = ["runuser", "-u", user, "--"] if user else []
    return ns.run([*prefix, "mailerctl", *args], check=check)


def report(ns: nsboot.SystemdNamespace, cid: int, *extra: str) -> dict:
    return json.loads(ctl(ns, "report", str(cid), "--json", *extra).stdout)


def enqueue(ns: nsboot.SystemdNamespace, directory: str) -> int:
    return json.loads(ctl(ns, "enqueue", f"/run/host/{directory}/campaign.toml",
                          "--recipients", f"/run/host/{directory}/list.csv", "--json").stdout)["id"]


def received(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def exists(ns: nsboot.SystemdNamespace, path: str) -> bool:
    return ns.run(["test", "-e", path], check=False).returncode == 0


def journal_entries(ns: nsboot.SystemdNamespace) -> list[dict]:
    lines = ns.run(["journalctl", "--no-pager", "-o", "json", "-u", "mailerd"]).stdout.splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def assert_delivered_once(ns: nsboot.SystemdNamespace, cid: int, got: list[str],
                          count: int, domain: str) -> dict:
    final = report(ns, cid)
    uncertain = {r["email"] for r in report(ns, cid, "--state", "uncertain")["recipients"]}
    mine = Counter(a for a in got if a.endswith("@" + domain))
    assert_nobody_lost_or_sent_twice(mine, uncertain, campaign_addresses(count, domain),
                                     final["counts"]["sent"], final["counts"]["uncertain"])
    return final


@needs_nsboot
def test_install_run_upgrade_remove_purge(system: nsboot.SystemdNamespace, packages, tmp_path):
    ns, host = system, tmp_path / "host"
    first, second = packages
    new_version = project_version() + UPGRADE_SUFFIX

    # a container image's policy-rc.d ("exit 101": start and stop nothing) would keep the
    # maintainer scripts from stopping and starting the service, as on no real server
    ns.run(["rm", "-f", "/usr/sbin/policy-rc.d"])

    # ---- install: enabled, user and credentials directory made, not started
    out = apt(ns, "install", f"/run/host/{first.name}")
    assert "enabled, not started" in out, out
    assert ns.systemctl("is-enabled", "mailerd", check=False).stdout.strip() == "enabled"
    assert ns.show("mailerd", "ActiveState") == "inactive"
    assert ns.run(["id", "-un", "mailerd"]).stdout.strip() == "mailerd"
    assert ns.run(["stat", "-c", "%a %U", "/etc/mailerd/credentials"]).stdout.split() == ["700", "root"]
    assert ns.run(["readlink", "-f", "/opt/mailerd/bin/python3"]).stdout.strip().startswith("/usr/bin/")
    assert ns.run(["mailerd", "--config", "/etc/mailerd/mailerd.toml", "--check-config"]).returncode == 0

    # ---- with the example config a start is skipped, with one line saying what to edit
    ns.systemctl("start", "mailerd", check=False)
    assert ns.show("mailerd", "ActiveState") == "inactive"
    status = ns.systemctl("status", "mailerd", check=False).stdout
    assert "names no relay yet" in status and "smtp.example.net" in status, status
    assert "Skipped due to 'exec-condition'" in status, status  # skipped, not failed

    # ---- the relay, inside the same network namespace
    ns.run(["systemd-run", "--unit=relay", "--collect", f"--setenv=PYTHONPATH={ROOT}",
            sys.executable, "-m", "mailerd.testing.relay", "--port", str(RELAY_PORT), "--quiet",
            "--reply-delay", "0.05", "--record", "/run/host/received.txt"])
    wait_until(lambda: "listening" in ns.run(["journalctl", "-u", "relay", "-o", "cat",
                                               "--no-pager"], check=False).stdout,
               20, "the relay to listen")

    # ---- edit the config, start, status (root, and a member of group mailerd)
    ns.run(["sh", "-c", "cat > /etc/mailerd/mailerd.toml"], input=CONFIG)
    ns.systemctl("start", "mailerd")
    assert ns.show("mailerd", "ActiveState") == "active"
    assert "server relay  127.0.0.1:2525" in ctl(ns, "status").stdout
    ns.run(["useradd", "--create-home", "--groups", "mailerd", "alice"])
    assert ctl(ns, "status", user="alice").returncode == 0

    # ---- a campaign with mailerctl; journalctl's fields
    make_campaign(host / "c1", FIRST_COUNT, domain="first.example", servers=["relay"])
    c1 = enqueue(ns, "c1")
    wait_until(lambda: report(ns, c1)["state"] == "done", 60, "the first campaign to be done")
    assert_delivered_once(ns, c1, received(host / "received.txt"), FIRST_COUNT, "first.example")
    ours = [e for e in journal_entries(ns) if "MAILERD_EVENT" in e]
    sent = [e for e in ours if e["MAILERD_EVENT"] == "sent" and e["MAILERD_CAMPAIGN"] == str(c1)]
    assert {e["MAILERD_RECIPIENT"] for e in sent} == campaign_addresses(FIRST_COUNT, "first.example")
    assert all(e["SMTP_CODE"] == "250" and e["MAILERD_SERVER"] == "relay" for e in sent)
    assert all(e["SYSLOG_IDENTIFIER"] == "mailerd" for e in sent)
    ready = next(e for e in ours if e["MAILERD_EVENT"] == "daemon_ready")
    assert "/opt/mailerd/bin/mailerd" in ready["_CMDLINE"], ready["_CMDLINE"]

    # ---- upgrade in the middle of a second campaign
    make_campaign(host / "c2", UPGRADE_COUNT, domain="second.example", servers=["relay"])
    c2 = enqueue(ns, "c2")
    wait_until(lambda: report(ns, c2)["counts"]["sent"] >= 100, 60, "the second campaign to run")
    before_pid = ns.show("mailerd", "MainPID")
    apt(ns, "install", f"/run/host/{second.name}")
    after = report(ns, c2)
    assert after["state"] != "done", "the upgrade came too late to interrupt the campaign"
    assert ns.run(["dpkg-query", "-W", "-f", "${Version}", "mailerd"]).stdout == new_version
    assert ns.show("mailerd", "ActiveState") == "active"
    assert ns.show("mailerd", "MainPID") != before_pid, "the daemon was not restarted"
    assert ns.run(["cat", "/etc/mailerd/mailerd.toml"]).stdout == CONFIG
    leftovers = ns.run(["sh", "-c", "ls /etc/mailerd/*.dpkg-* 2>/dev/null || true"]).stdout
    assert not leftovers.strip(), leftovers
    wait_until(lambda: report(ns, c2)["state"] == "done", 120, "the second campaign to be done")
    assert_delivered_once(ns, c2, received(host / "received.txt"), UPGRADE_COUNT, "second.example")
    assert report(ns, c1)["counts"]["sent"] == FIRST_COUNT  # the journal survived
    assert ns.systemctl("is-enabled", "mailerd", check=False).stdout.strip() == "enabled"

    # ---- remove: stopped, program gone, journal and config kept
    apt(ns, "remove", "mailerd")
    assert ns.show("mailerd", "ActiveState") in ("inactive", "")
    assert not exists(ns, "/opt/mailerd") and not exists(ns, "/usr/bin/mailerctl")
    assert exists(ns, "/var/lib/mailerd/journal.sqlite3")
    assert exists(ns, "/etc/mailerd/mailerd.toml")

    # ---- purge: journal, config and enablement gone
    apt(ns, "purge", "mailerd")
    state = ns.run(["dpkg-query", "-W", "-f", "${db:Status-Status}", "mailerd"], check=False)
    assert state.returncode != 0 or state.stdout == "not-installed", state.stdout
    for gone in ("/var/lib/mailerd", "/etc/mailerd",
                 "/etc/systemd/system/multi-user.target.wants/mailerd.service"):
        assert not exists(ns, gone), f"{gone} is still there after purge"


@pytest.mark.parametrize(("config", "starts"), [
    ((ROOT / "packaging" / "mailerd.toml").read_text(), False),  # the shipped example
    ("[daemon]\n", False),
    ('[servers.a]\nhost = "mx.example.org"\n[servers.b]\nhost = "relay.invalid"\n', False),
    (CONFIG, True),
    ('[servers.a]\nhost = "smtp.example.net"\n[servers.b]\nhost = "10.1.2.3"\n', True),
    ("[servers.a\n", True),  # unparsable: the daemon reports it with file and line
])
def test_start_condition_wants_a_named_relay(tmp_path, config: str, starts: bool):
    path = tmp_path / "mailerd.toml"
    path.write_text(config)
    done = subprocess.run(["/usr/bin/python3", str(RELAY_NAMED), str(path)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == (0 if starts else 1), done.stderr
    if not starts:
        line = done.stderr.strip()
        assert line.startswith(f"mailerd not started: {path} names no relay yet") and "\n" not in line
        assert line.endswith("then: systemctl start mailerd")


@pytest.mark.skipif(shutil.which("lintian") is None or _reason is not None,
                    reason="lintian is not installed" if shutil.which("lintian") is None
                    else f"package test skipped: {_reason}")
def test_lintian_is_clean(packages):
    """No error or warning that packaging/deb/lintian-overrides does not explain."""
    first, _ = packages
    done = subprocess.run(["lintian", "--fail-on", "error,warning", str(first)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    tags = [line for line in done.stdout.splitlines() if re.match(r"[EW]: ", line)]
    assert not tags, tags
