"""The daemon's configuration as msgspec Structs: every key, its type and its bounds.

Pure data, no file access: mailerd/config.py reads the TOML and decodes it into
these. A value that does not fit its bounds fails while decoding: an `Annotated`
constraint, or a `__post_init__` raising `problem(field, why)`, which msgspec turns
into a ValidationError carrying the path, so the loader can name the key
(`servers.isp.port`). Durations are written "500ms", "30s", "5m", "1h", "1d" or
as a number of seconds, and are bounded (MAX_DURATION).
"""

from __future__ import annotations

import math
import os
import re
import socket
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple

import msgspec
from msgspec import Meta

MAX_DURATION = 30 * 86400.0  # a pause or timeout longer than this is a typing error

NonNegative = Annotated[int, Meta(ge=0)]

# the names email_validator refuses as special-use (its SPECIAL_USE_DOMAIN_NAMES)
SPECIAL_USE_DOMAINS = frozenset({"arpa", "invalid", "local", "localhost", "onion", "test"})


def shorten(text: object, limit: int = 20) -> str:
    """`text` for an error message, cut short: a 400-digit number need not be echoed."""
    shown = str(text)
    return shown if len(shown) <= limit else f"{shown[:limit - 3]}..."


def problem(field: str, why: str) -> ValueError:
    """A value that decodes but makes no sense; the loader turns `field` into the full key."""
    return ValueError(f"`{field}`: {why}")


class Duration(float):
    """Seconds, written in the config as "30s", "5m", "1h" ..."""


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def parse_duration(value: object) -> Duration:
    if isinstance(value, bool):
        raise ValueError(f"invalid duration {value!r}")
    if isinstance(value, (int, float)):
        return _bounded(value if isinstance(value, float) else _int_seconds(value), value)
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            return _bounded(float(match[1]) * _UNIT_SECONDS[match[2]], value)
    raise ValueError(f'invalid duration {value!r}: use e.g. "30s", "5m", "1h"')


def _int_seconds(value: int) -> float:
    try:
        return float(value)
    except OverflowError:
        return math.inf


def _bounded(seconds: float, written: object) -> Duration:
    if not math.isfinite(seconds) or not 0 <= seconds <= MAX_DURATION:
        raise ValueError(f"invalid duration {shorten(written)!r}: must be between 0 and "
                         f"{MAX_DURATION / 86400:g} days")
    return Duration(seconds)


def decode_hook(type_: type, obj: Any) -> Any:
    """msgspec's dec_hook for the config's own types (Duration)."""
    if type_ is Duration:
        return parse_duration(obj)
    raise NotImplementedError


_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|sec|second|m|min|minute|h|hour|d|day)\s*$")
_PER = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60,
        "h": 3600, "hour": 3600, "d": 86400, "day": 86400}


class Rate(NamedTuple):
    count: float
    per: float  # seconds

    @property
    def per_second(self) -> float:
        return self.count / self.per


def parse_rate(text: str) -> Rate:
    match = _RATE.match(text)
    if not match or not 0 < float(match[1]) < math.inf:
        raise ValueError(f'invalid rate {shorten(text)!r}: use e.g. "20/s", "30/min", "500/h"')
    return Rate(float(match[1]), float(_PER[match[2]]))


def invalid_regex(pattern: str) -> str | None:
    """Why `pattern` is not a valid regular expression; None when it is."""
    try:
        re.compile(pattern)
    except re.error as exc:
        return f"{pattern!r} is not a valid regular expression ({exc})"
    return None


class Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class DaemonConfig(Section):
    state_dir: str | None = None
    socket: str | None = None
    socket_mode: int | None = None  # default 0o660 with a socket_group, else 0o600
    socket_group: str | None = None  # members (and root, and our own user) may use the socket
    admin_group: str | None = None  # members may also change others' campaigns, suppress remove, set
    debug_commands: bool = False  # honour debugging requests such as debug-freeze
    journal_sync: Literal["normal", "full"] = "full"  # "full": a commit survives power loss
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    shutdown_timeout: Duration = Duration(30)

    def __post_init__(self) -> None:
        if self.socket_mode is not None and not 0 <= self.socket_mode <= 0o777:
            raise problem("socket_mode", "must be a file mode such as 0o660")


class DeliveryConfig(Section):
    retry_initial: Duration = Duration(60)
    retry_max: Duration = Duration(3600)
    max_attempts: Annotated[int, Meta(ge=1)] = 10
    reconnect_initial: Duration = Duration(1)
    reconnect_max: Duration = Duration(60)
    # special-use domains (RFC 6761/6762) whose addresses are accepted, for a relay that
    # serves them (an intranet's .local, a test setup's .test); by default all are refused
    allow_special_use_domains: list[str] = msgspec.field(default_factory=list)

    def __post_init__(self) -> None:
        if self.retry_max < self.retry_initial:
            raise problem("retry_max", "must not be less than retry_initial")
        for name in self.allow_special_use_domains:
            if name.strip(".").lower() not in SPECIAL_USE_DOMAINS:
                raise problem("allow_special_use_domains",
                              f"{shorten(name)!r} is not a special-use domain (one of "
                              f"{', '.join(sorted(SPECIAL_USE_DOMAINS))})")
        self.allow_special_use_domains = [name.strip(".").lower()
                                          for name in self.allow_special_use_domains]


class ServerConfig(Section):
    host: str = "127.0.0.1"
    port: Annotated[int, Meta(ge=1, le=65535)] = 25
    security: Literal["none", "starttls", "tls"] = "none"
    username: str | None = None
    password_file: str | None = None
    tls_verify: bool = True
    tls_ca_file: str | None = None  # PEM bundle of the CAs to trust for this relay (private CA)
    tls_server_name: str | None = None  # the name its certificate must carry (default: host)
    allow_plaintext_auth: bool = False  # AUTH without TLS (a loopback relay); else a config error
    connections: Annotated[int, Meta(ge=1, le=256)] = 1
    timeout: Duration = Duration(60)
    helo_name: str | None = None
    # DKIM for everything sent through this server (a campaign's own `dkim` wins);
    # the key file is read once at start and never logged
    dkim_domain: str | None = None
    dkim_selector: str | None = None
    dkim_key_file: str | None = None  # $CREDENTIALS_DIRECTORY is expanded
    # the From domains this key may sign (review L10); None: dkim_domain alone
    dkim_domains: list[str] | None = None
    # pacing (all live-changeable with `mailerctl set` or SIGHUP)
    group_size: NonNegative = 0  # after this many messages through this account ...
    group_interval: Duration = Duration(0)  # ... all its sessions pause this long
    messages_per_connection: NonNegative = 0  # QUIT and reconnect after this many (0: no limit)
    rate: str | None = None  # e.g. "20/s", "30/min", "500/h"
    hourly_quota: NonNegative = 0
    daily_quota: NonNegative = 0
    idle_timeout: Duration = Duration(30)  # QUIT a session idle this long, before the relay cuts it
    clean_period: Duration = Duration(60)  # a lowered limit recovers one step after this long
    quota_cooloff: Duration = Duration(300)  # first park on a quota refusal with no known window
    # VERP envelope sender for what goes through this server ("bounces+{{ tag }}@example.org");
    # a campaign's own return_path wins
    return_path: str | None = None

    def __post_init__(self) -> None:
        why = return_path_problem(self.return_path)
        if why:
            raise problem("return_path", why)
        if self.rate is not None:
            try:
                parse_rate(self.rate)
            except ValueError as exc:
                raise problem("rate", str(exc)) from None
        if self.group_size and not self.group_interval:
            raise problem("group_size", "needs group_interval")
        if self.timeout <= 0:
            raise problem("timeout", "must be positive")
        if self.password_file and not self.username:
            raise problem("password_file", "needs username")
        dkim_keys = (self.dkim_domain, self.dkim_selector, self.dkim_key_file)
        if any(dkim_keys) and not all(dkim_keys):
            raise problem("dkim_domain", "dkim_domain, dkim_selector and dkim_key_file go together")
        self._check_dkim_domains()
        self._check_tls()

    def _check_dkim_domains(self) -> None:
        if self.dkim_domains is None:
            return
        if not self.dkim_key_file:
            raise problem("dkim_domains", "needs dkim_key_file")
        for domain in self.dkim_domains:
            if not domain.strip(" .") or "@" in domain or any(c.isspace() for c in domain.strip()):
                raise problem("dkim_domains", f"{domain!r} is not a domain name")

    def _check_tls(self) -> None:
        """TLS trust and AUTH settings that cannot work or would leak the password."""
        if self.username and self.security == "none" and not self.allow_plaintext_auth:
            raise problem("username", 'with security = "none" the password would go in plaintext; '
                          'use security = "starttls" or "tls" (or allow_plaintext_auth = true '
                          'for a relay on this host)')
        for key in ("tls_ca_file", "tls_server_name"):
            if getattr(self, key) and self.security == "none":
                raise problem(key, 'needs security = "starttls" or "tls"')
        if self.tls_ca_file and not self.tls_verify:
            raise problem("tls_ca_file", "is not used with tls_verify = false")


PACING_KEYS = (
    "connections", "group_size", "group_interval", "messages_per_connection", "rate",
    "hourly_quota", "daily_quota", "idle_timeout", "clean_period", "quota_cooloff",
)


class PatternConfig(Section):
    """Extra regular expressions (case-insensitive) for pacing/classify.py, tried before
    its defaults."""

    too_many_sessions: list[str] = []
    rate: list[str] = []
    quota: list[str] = []
    session_length: list[str] = []

    def __post_init__(self) -> None:
        for key in self.__struct_fields__:
            _check_regexes(key, getattr(self, key))


def _check_regexes(key: str, patterns: list[str]) -> None:
    for i, pattern in enumerate(patterns):
        why = invalid_regex(pattern)
        if why:
            raise problem(f"{key}[{i}]", why)


DEFAULT_BOUNCE_PATTERNS = [
    r"no such (user|mailbox|recipient)", r"user unknown", r"unknown (user|recipient|mailbox)",
    r"does not exist", r"mailbox unavailable", r"mailbox not found", r"invalid recipient",
    r"\b5\.1\.(1|2|3|6|10)\b",
]


class SuppressionConfig(Section):
    auto_bounce: bool = True  # a 5xx matching bounce_patterns suppresses the address ("bounced")
    bounce_patterns: list[str] = msgspec.field(default_factory=lambda: list(DEFAULT_BOUNCE_PATTERNS))

    def __post_init__(self) -> None:
        _check_regexes("bounce_patterns", self.bounce_patterns)


_TAG_PLACEHOLDER = re.compile(r"\{\{\s*tag\s*\}\}")


def return_path_problem(return_path: str | None) -> str | None:
    """Why `return_path` cannot be a VERP envelope-sender template, or None."""
    if return_path is None:
        return None
    if len(_TAG_PLACEHOLDER.findall(return_path)) != 1:
        return f"{return_path!r} must hold {{{{ tag }}}} exactly once"
    local, at, domain = _TAG_PLACEHOLDER.sub("tag", return_path).rpartition("@")
    if (not at or not local or not domain or not return_path.isascii()
            or re.search(r"[\s<>\"\\,;:()\[\]@]", local + domain)):
        return f"{return_path!r} is not a plain address like bounces+{{{{ tag }}}}@example.org"
    return None


class MailboxConfig(Section, kw_only=True):
    """One IMAP mailbox that bounces and complaints arrive in (bounces/imap.py)."""

    host: str
    port: Annotated[int, Meta(ge=1, le=65535)] | None = None  # default 993 (tls) or 143
    security: Literal["tls", "starttls", "none"] = "tls"
    username: str
    password_file: str  # $CREDENTIALS_DIRECTORY is expanded; never logged
    tls_verify: bool = True
    tls_ca_file: str | None = None
    folder: str = "INBOX"
    # where a message goes once the journal has what it meant; "": it is deleted
    done_folder: str = "mailerd-done"
    allow_plaintext_login: bool = False  # LOGIN without TLS (a mailbox on this host)

    def __post_init__(self) -> None:
        if self.security == "none" and not self.allow_plaintext_login:
            raise problem("security", 'with "none" the password would go in plaintext; use "tls" or '
                          '"starttls" (or allow_plaintext_login = true for a mailbox on this host)')


class BouncesConfig(Section):
    """[bounces]: where bounces and complaints come back, and what they do."""

    mailboxes: dict[str, MailboxConfig] = {}
    poll_interval: Duration = Duration(300)
    soft_bounce_limit: Annotated[int, Meta(ge=1)] = 3  # soft bounces in a row that suppress

    def __post_init__(self) -> None:
        if self.poll_interval <= 0:
            raise problem("poll_interval", "must be positive")


class JournalConfig(Section):
    """[journal]: where the journal is. SQLite (one daemon, in the state directory) or
    PostgreSQL, which several daemons (hosts) share (journal/postgres.py)."""

    backend: Literal["sqlite", "postgresql"] = "sqlite"
    dsn: str | None = None  # libpq conninfo or URI; required for postgresql
    password_file: str | None = None  # $CREDENTIALS_DIRECTORY is expanded; a bare name is in it
    host_id: str = ""  # this daemon among the hosts; default: the machine's hostname
    lease: Duration = Duration(10)  # a host that has not renewed for this long is taken over

    def __post_init__(self) -> None:
        if self.backend == "postgresql" and not (self.dsn or "").strip():
            raise problem("dsn", 'is required with backend = "postgresql" '
                          '(e.g. "postgresql://mailerd@db.example.org/mailerd")')
        if self.backend == "sqlite":
            for key in ("dsn", "password_file"):
                if getattr(self, key):
                    raise problem(key, 'is used only with backend = "postgresql"')
        if self.host_id != self.host_id.strip() or len(self.host_id) > 200 or any(
                not c.isprintable() for c in self.host_id):
            raise problem("host_id", f"{shorten(self.host_id)!r} is not a usable host name "
                          "(printable, no surrounding spaces, at most 200 characters)")
        if self.lease < 1:
            raise problem("lease", "must be at least 1s (hosts renew it every lease/3)")

    @property
    def host(self) -> str:
        return self.host_id or socket.gethostname()


class Config(msgspec.Struct, kw_only=True):
    daemon: DaemonConfig
    delivery: DeliveryConfig
    servers: dict[str, ServerConfig]
    patterns: PatternConfig = msgspec.field(default_factory=PatternConfig)
    suppression: SuppressionConfig = msgspec.field(default_factory=SuppressionConfig)
    bounces: BouncesConfig = msgspec.field(default_factory=BouncesConfig)
    journal: JournalConfig = msgspec.field(default_factory=JournalConfig)
    path: str | None = None

    @property
    def state_dir(self) -> Path:
        if self.daemon.state_dir:
            return Path(self.daemon.state_dir)
        if os.environ.get("STATE_DIRECTORY"):
            return Path(os.environ["STATE_DIRECTORY"].split(":")[0])
        return Path("state")

    @property
    def socket_path(self) -> Path:
        if self.daemon.socket:
            return Path(self.daemon.socket)
        if os.environ.get("RUNTIME_DIRECTORY"):
            return Path(os.environ["RUNTIME_DIRECTORY"].split(":")[0]) / "control.sock"
        return self.state_dir / "control.sock"

    @property
    def socket_mode(self) -> int:
        if self.daemon.socket_mode is not None:
            return self.daemon.socket_mode
        return 0o660 if self.daemon.socket_group else 0o600


class ReloadResult(msgspec.Struct, frozen=True, kw_only=True):
    """What the daemon's last SIGHUP did, written to its state directory, so that
    `mailerd --reload PID` (the unit's ExecReload=) can make `systemctl reload` fail."""
    pid: int  # the daemon that reloaded
    count: int  # its reloads so far: a newer result has a higher count
    ok: bool
    message: str  # the config error when not ok
