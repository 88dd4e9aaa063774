"""Boot a real systemd as PID 1 of fresh PID, mount, UTS, IPC, network and cgroup namespaces.

Used by test_systemd.py to run mailerd.service under a real service manager
without touching the host:

* /run, /tmp, /var/tmp and /dev are private tmpfs mounts (Debian's tmpfiles.d
  has `D /tmp`, and a shared /tmp would be emptied); journald is volatile.
* /etc and /var/lib are overlays whose upper layers are host directories, so the
  test can install units, users (systemd-sysusers), /etc/mailerd ..., and
  StateDirectory= lands in the overlay: the host's /etc and /var/lib never change.
* `mounts` puts host directories at given places inside (e.g. /opt).
* The network namespace has only `lo`: nothing inside can reach the network.
* cgroups: the boot gets its own cgroup2 subtree (a cgroup namespace rooted at
  /sys/fs/cgroup/unified/<name>), so systemd runs in unified mode and never
  moves a process out of the cgroups the host gave this test.
* A small target is booted instead of the default one, every unit that some
  target merely "wants" is masked (fstab, sysctl, tmpfiles, utmp, random seed,
  timers, getty, postfix ...), and so is every generator.

* Units' private mounts propagate back (/ is made rshared inside, as a normal
  boot does), which LoadCredential= needs.

A boot to the small target takes well under a second here, a poweroff about as
long. Boots are serialised with a file lock (one at a time per machine). The
shell that starts the namespace stays outside as a guardian: if the test process
dies without a poweroff, it SIGKILLs the namespace's PID 1 (systemd outlives a
killed unshare otherwise) and removes the cgroup subtree.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import time
import uuid
import contextlib
from pathlib import Path
from typing import Iterator, Sequence

from mailerd.testing.waiting import wait_until

SYSTEMD = Path("/lib/systemd/systemd")
CGROUP2 = Path("/sys/fs/cgroup/unified")
LOCK = Path("/run/lock/mailerd-systemd-test.lock") if Path("/run/lock").is_dir() \
    else Path("/var/lock/mailerd-systemd-test.lock")
UNIT_DIRS = (Path("/lib/systemd/system"), Path("/usr/lib/systemd/system"),
             Path("/etc/systemd/system"))
GENERATOR_DIRS = (Path("/lib/systemd/system-generators"),
                  Path("/usr/lib/systemd/system-generators"))
# what the booted system keeps of everything targets pull in
KEEP = {"systemd-journald.service", "systemd-journald.socket",
        "systemd-journald-dev-log.socket"}
HOST_MOUNT = "/run/host"  # where the test's shared directory appears inside
TARGET = "mailerd-test.target"


def unavailable() -> str | None:
    """Why a namespace boot cannot work here, or None."""
    import sys
    if not sys.platform.startswith("linux"):
        return "needs Linux"
    if os.geteuid() != 0:
        return "needs root (namespaces, mounts, cgroups)"
    if not SYSTEMD.exists():
        return f"systemd is not installed ({SYSTEMD} missing)"
    for tool in ("unshare", "nsenter", "systemctl", "journalctl", "systemd-sysusers"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if not (CGROUP2 / "cgroup.procs").exists() and not _is_cgroup2(Path("/sys/fs/cgroup")):
        return "no cgroup2 hierarchy mounted"
    return None


def _is_cgroup2(path: Path) -> bool:
    try:
        return (path / "cgroup.controllers").exists()
    except OSError:
        return False


def _cgroup2_root() -> Path:
    return CGROUP2 if (CGROUP2 / "cgroup.procs").exists() else Path("/sys/fs/cgroup")


def _own_cgroup2_path() -> str:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return line[3:]
    return "/"


class BootError(Exception):
    pass


class SystemdNamespace:
    """One booted systemd; `run` executes a command inside all its namespaces."""

    def __init__(self, workdir: Path, host_dir: Path, *, binds: Sequence[Path] = (),
                 mounts: dict[str, Path] | None = None) -> None:
        self.workdir = workdir
        self.host_dir = host_dir  # bind-mounted at /run/host inside
        self.binds = [Path(p) for p in binds]  # host paths that must stay visible at the same place
        self.mounts = dict(mounts or {})  # inside path (must exist) -> host directory
        self.overlays = {}
        for inside in ("/etc", "/var/lib"):
            name = inside.strip("/").replace("/", "-")
            upper, work = workdir / f"{name}-upper", workdir / f"{name}-work"
            upper.mkdir(parents=True, exist_ok=True)
            work.mkdir(parents=True, exist_ok=True)
            self.overlays[inside] = (upper, work)
        self.upper = self.overlays["/etc"][0]
        self.log_path = workdir / "systemd-console.log"
        self.name = f"mailerd-test-{uuid.uuid4().hex[:12]}"
        cg_parent = _cgroup2_root() / _own_cgroup2_path().lstrip("/")
        self.cgroup = cg_parent / self.name
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid: int | None = None  # host pid of the namespace's PID 1 (systemd)
        self.state = ""  # systemctl is-system-running, once booted
        self._last_state = ""
        self._lock_fd: int | None = None
        self._prepare_etc()

    # ------------------------------------------------------------------ /etc

    def etc(self, relative: str) -> Path:
        """The host path of /etc/<relative> inside (write before boot)."""
        path = self.upper / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def mask(self, unit: str) -> None:
        link = self.etc(f"systemd/system/{unit}")
        if not link.is_symlink():
            link.symlink_to("/dev/null")

    def _prepare_etc(self) -> None:
        wanted: set[str] = set()
        for base in UNIT_DIRS:
            if not base.is_dir():
                continue
            for wants in list(base.glob("*.wants")) + list(base.glob("*.requires")):
                for entry in wants.iterdir():
                    wanted.add(entry.name)
        for unit in sorted(wanted - KEEP):
            if not unit.endswith(".target") and not unit.endswith(".slice"):
                self.mask(unit)
        for unit in ("systemd-journald-audit.socket", "tmp.mount", "systemd-sysctl.service",
                     "systemd-tmpfiles-setup.service", "systemd-tmpfiles-setup-dev.service",
                     "systemd-update-utmp.service", "systemd-random-seed.service",
                     "systemd-journal-flush.service", "systemd-remount-fs.service",
                     "systemd-timesyncd.service", "systemd-journal-catalog-update.service",
                     "systemd-update-done.service", "ldconfig.service"):
            self.mask(unit)
        generators: set[str] = set()
        for base in GENERATOR_DIRS:
            if base.is_dir():
                generators.update(entry.name for entry in base.iterdir())
        for name in sorted(generators):
            link = self.etc(f"systemd/system-generators/{name}")
            if not link.is_symlink():
                link.symlink_to("/dev/null")
        self.etc("systemd/journald.conf.d/test.conf").write_text(
            "[Journal]\nStorage=volatile\nForwardToSyslog=no\n"
            "ForwardToConsole=no\nForwardToWall=no\n")
        self.etc("systemd/system.conf.d/test.conf").write_text(
            "[Manager]\nShowStatus=no\nDefaultTimeoutStartSec=20s\nDefaultTimeoutStopSec=10s\n"
            "DefaultStandardOutput=journal\nDefaultStandardError=inherit\n")
        self.etc(f"systemd/system/{TARGET}").write_text(
            "[Unit]\nDescription=mailerd test boot\nRequires=basic.target\n"
            "After=basic.target\nAllowIsolate=yes\n")
        self.etc("hostname").write_text("mailerd-test\n")

    # ------------------------------------------------------------------ boot

    def _inner_script(self) -> str:
        q = _shell_quote
        lines = [
            "set -eu",
            "mount --make-rprivate /",
            # /mnt (in this mount namespace only) holds what must stay visible under
            # the paths that get a private tmpfs
            "mount -t tmpfs -o mode=0700 stage /mnt",
            "mkdir /mnt/host /mnt/dev",
            f"mount --rbind {q(str(self.host_dir))} /mnt/host",
            "mount --rbind /dev /mnt/dev",
        ]
        moved = []
        for i, path in enumerate(self.binds):
            if _under(path, ("/tmp", "/var/tmp", "/run", "/dev", "/mnt")):
                lines += [f"mkdir /mnt/{i}", f"mount --rbind {q(str(path))} /mnt/{i}"]
                moved.append((f"/mnt/{i}", path))
        placed = []
        for i, (inside, path) in enumerate(self.mounts.items()):
            lines += [f"mkdir /mnt/m{i}", f"mount --rbind {q(str(path))} /mnt/m{i}"]
            placed.append((f"/mnt/m{i}", inside))
        for inside, (upper, work) in self.overlays.items():
            lines.append(f"mount -t overlay overlay -o lowerdir={inside},upperdir={q(str(upper))},"
                         f"workdir={q(str(work))} {inside}")
        lines += [
            "mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /tmp",
            "mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /var/tmp",
            "mount -t tmpfs -o mode=0755,nosuid,nodev run /run",
            # a private /dev with the usual nodes, so nothing is created in the host's
            "mount -t tmpfs -o mode=0755,nosuid devtmp /dev",
        ]
        for node in ("null", "zero", "full", "random", "urandom", "tty"):
            lines += [f"touch /dev/{node}", f"mount --bind /mnt/dev/{node} /dev/{node}"]
        lines += [
            "mkdir -p /dev/pts /dev/shm /dev/mqueue",
            "mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts /dev/pts",
            "ln -s pts/ptmx /dev/ptmx",
            "mount -t tmpfs -o mode=1777,nosuid,nodev shm /dev/shm",
            "ln -s /proc/self/fd /dev/fd",
            "ln -s /proc/self/fd/0 /dev/stdin",
            "ln -s /proc/self/fd/1 /dev/stdout",
            "ln -s /proc/self/fd/2 /dev/stderr",
            "touch /dev/console",
            "mount --bind /mnt/dev/null /dev/console",
            # cgroup2 rooted at this namespace's own subtree
            "umount -R /sys/fs/cgroup 2>/dev/null || umount -l /sys/fs/cgroup",
            "mount -t cgroup2 -o nsdelegate cgroup2 /sys/fs/cgroup",
            f"mkdir -p {HOST_MOUNT}",
            f"mount --rbind /mnt/host {HOST_MOUNT}",
        ]
        for stage, path in moved:
            lines += [f"mkdir -p {q(str(path))}", f"mount --rbind {stage} {q(str(path))}"]
        for stage, inside in placed:
            lines += [f"mount --rbind {stage} {q(inside)}"]
        lines += [
            "umount -R /mnt 2>/dev/null || umount -l /mnt",
            "ip link set lo up 2>/dev/null || true",
            # as on a normal boot (systemd skips this when it sees a container): units'
            # private mounts, such as /run/credentials/*, propagate back. The peer groups
            # are new ones, within this namespace only: nothing reaches the host.
            "mount --make-rshared /",
            f"exec {SYSTEMD} --unit={TARGET} --log-target=journal --log-level=info "
            "--show-status=no",
        ]
        return "\n".join(lines)

    def boot(self, timeout: float = 30.0) -> None:
        LOCK.parent.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        cg, parent = _shell_quote(str(self.cgroup)), _shell_quote(str(self.cgroup.parent))
        # The shell stays outside as a guardian: if the test process dies without a
        # poweroff, it SIGKILLs the namespace's PID 1 (which takes everything inside
        # with it) and removes the cgroup subtree.
        outer = f"""
set -eu
mkdir {cg}
echo $$ > {cg}/cgroup.procs
unshare --cgroup --pid --fork --mount --uts --ipc --net --propagation private --mount-proc \\
    -- sh -c "$INNER" &
U=$!
echo $$ > {parent}/cgroup.procs
alive() {{ s=$(cut -d' ' -f3 /proc/$U/stat 2>/dev/null) && [ "$s" != Z ]; }}
while alive && kill -0 "$TEST_PID" 2>/dev/null; do sleep 0.1; done
if alive; then
    for c in $(cat /proc/$U/task/$U/children); do kill -KILL "$c" || true; done
fi
wait $U || true
find {cg} -depth -type d -exec rmdir {{}} + 2>/dev/null || true
"""
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "container": "mailerd-test",
               "INNER": self._inner_script(), "LANG": "C.UTF-8", "TEST_PID": str(os.getpid())}
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(["sh", "-c", outer], stdin=subprocess.DEVNULL,
                                     stdout=log, stderr=log, env=env, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        self.pid = self._await_boot(self._started_pid, deadline, "the namespace to start", 0.02)
        self.state = self._await_boot(self._booted_state, deadline,
                                      "systemd to finish booting", 0.05)

    def _await_boot(self, probe, deadline: float, what: str, interval: float):
        try:
            return wait_until(probe, max(0.0, deadline - time.monotonic()), what, interval,
                              error=BootError)
        except BootError as exc:
            raise BootError(f"{exc} (last state {self._last_state!r}):\n{self.console()}") from None

    def _started_pid(self) -> int | None:
        self._check_alive()
        return self._child_pid()

    def _booted_state(self) -> str | None:
        self._check_alive()
        state = self.run(["systemctl", "is-system-running"], check=False).stdout.strip()
        self._last_state = state
        return state if state in ("running", "degraded") else None

    def _child_pid(self) -> int | None:
        """The host pid of systemd: the child of unshare, itself the guardian's child."""
        assert self.proc is not None
        for unshare in _children(self.proc.pid):
            if _comm(unshare) == "unshare":
                for pid in _children(unshare):
                    if _comm(pid) == "systemd":
                        return pid
        return None

    def _check_alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise BootError(f"namespace exited with {self.proc.returncode}:\n{self.console()}")

    def console(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # ------------------------------------------------------------------ inside

    def run(self, argv: Sequence[str], *, check: bool = True, timeout: float = 60.0,
            input: str | None = None, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
        """Run argv inside every namespace of the booted system, as root."""
        assert self.pid is not None
        full_env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
                    "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0", **(env or {})}
        result = subprocess.run(
            ["nsenter", "-t", str(self.pid), "-m", "-u", "-i", "-n", "-p", "-C",
             "--wd=/", *argv],
            capture_output=True, text=True, timeout=timeout, env=full_env, input=input,
            cwd="/",
        )
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} exited {result.returncode} inside:\n"
                                 f"{result.stdout}\n{result.stderr}")
        return result

    def systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run(["systemctl", "--no-pager", *args], check=check)

    def show(self, unit: str, prop: str) -> str:
        return self.systemctl("show", "-p", prop, "--value", unit).stdout.strip()

    # ------------------------------------------------------------------ shutdown

    def shutdown(self, timeout: float = 20.0) -> None:
        try:
            if self.proc is not None and self.proc.poll() is None:
                if self.pid is not None:
                    try:
                        os.kill(self.pid, signal.SIGRTMIN + 4)  # systemd: poweroff
                    except ProcessLookupError:
                        pass
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    if self.pid is not None:
                        try:
                            os.kill(self.pid, signal.SIGKILL)
                        except ProcessLookupError:
                            pass
                    self.proc.wait(10)
            self._remove_cgroup()
        finally:
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None

    def _remove_cgroup(self) -> None:
        if not self.cgroup.exists():
            return
        deadline = time.monotonic() + 5
        for directory in sorted((p for p in self.cgroup.rglob("*") if p.is_dir()),
                                key=lambda p: len(p.parts), reverse=True) + [self.cgroup]:
            while True:
                try:
                    directory.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.05)


@contextlib.contextmanager
def booted(ns: SystemdNamespace, journal_lines: int = 150) -> Iterator[SystemdNamespace]:
    """Boot `ns`; afterwards print its journal's last lines (pytest shows them only when the
    test failed) and shut it down, whatever happened."""
    try:
        ns.boot()
        yield ns
    finally:
        try:
            if ns.pid is not None:
                print(ns.run(["journalctl", "--no-pager", "-n", str(journal_lines),
                              "-o", "short-monotonic"], check=False, timeout=20).stdout)
        finally:
            ns.shutdown()


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _under(path: Path, roots: Sequence[str]) -> bool:
    return any(path == Path(root) or Path(root) in path.parents for root in roots)


def _shell_quote(text: str) -> str:
    return "'" + text.replace("'", "'\"'\"'") + "'"
