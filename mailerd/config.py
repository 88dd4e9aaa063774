"""The daemon's configuration: a TOML file parsed into msgspec Structs.

Every error names the file and the key (`servers.isp.port`), and is raised before
anything starts. Durations are written "500ms", "30s", "5m", "1h", "1d" or as a
number of seconds.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

import msgspec

from mailerd.pacing.classify import PatternConfig, validate_patterns


class ConfigError(Exception):
    pass


class Duration(float):
    """Seconds, written in the config as "30s", "5m", "1h" ..."""


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def parse_duration(value: object) -> Duration:
    if isinstance(value, bool):
        raise ValueError(f"invalid duration {value!r}")
    if isinstance(value, (int, float)):
        return Duration(value)
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            return Duration(float(match[1]) * _UNIT_SECONDS[match[2]])
    raise ValueError(f'invalid duration {value!r}: use e.g. "30s", "5m", "1h"')


def _dec_hook(type_: type, obj: Any) -> Any:
    if type_ is Duration:
        return parse_duration(obj)
    raise NotImplementedError


class Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class DaemonConfig(Section):
    state_dir: str | None = None
    socket: str | None = None
    socket_mode: int | None = None  # default 0o660 with a socket_group, else 0o600
    socket_group: str | None = None  # members (and root, and our own user) may use the socket
    debug_commands: bool = False  # honour debugging requests such as debug-freeze
    journal_sync: Literal["normal", "full"] = "full"  # "full": a commit survives power loss
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    shutdown_timeout: Duration = Duration(30)


class DeliveryConfig(Section):
    retry_initial: Duration = Duration(60)
    retry_max: Duration = Duration(3600)
    max_attempts: int = 10
    reconnect_initial: Duration = Duration(1)
    reconnect_max: Duration = Duration(60)


class ServerConfig(Section):
    host: str = "127.0.0.1"
    port: int = 25
    security: Literal["none", "starttls", "tls"] = "none"
    username: str | None = None
    password_file: str | None = None
    tls_verify: bool = True
    connections: int = 1
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
    group_size: int = 0  # after this many messages through this account ...
    group_interval: Duration = Duration(0)  # ... all its sessions pause this long
    messages_per_connection: int = 0  # QUIT and reconnect after this many (0: no limit)
    rate: str | None = None  # e.g. "20/s", "30/min", "500/h"
    hourly_quota: int = 0
    daily_quota: int = 0
    idle_timeout: Duration = Duration(30)  # QUIT a session idle this long, before the relay cuts it
    clean_period: Duration = Duration(60)  # a lowered limit recovers one step after this long
    quota_cooloff: Duration = Duration(300)  # first park on a quota refusal with no known window


PACING_KEYS = (
    "connections", "group_size", "group_interval", "messages_per_connection", "rate",
    "hourly_quota", "daily_quota", "idle_timeout", "clean_period", "quota_cooloff",
)


DEFAULT_BOUNCE_PATTERNS = [
    r"no such (user|mailbox|recipient)", r"user unknown", r"unknown (user|recipient|mailbox)",
    r"does not exist", r"mailbox unavailable", r"mailbox not found", r"invalid recipient",
    r"\b5\.1\.(1|2|3|6|10)\b",
]


class SuppressionConfig(Section):
    auto_bounce: bool = True  # a 5xx matching bounce_patterns suppresses the address ("bounced")
    bounce_patterns: list[str] = msgspec.field(default_factory=lambda: list(DEFAULT_BOUNCE_PATTERNS))


class Config(msgspec.Struct, kw_only=True):
    daemon: DaemonConfig
    delivery: DeliveryConfig
    servers: dict[str, ServerConfig]
    patterns: PatternConfig = msgspec.field(default_factory=PatternConfig)
    suppression: SuppressionConfig = msgspec.field(default_factory=SuppressionConfig)
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


def _section(value: Any, dotted: str, type_: type, where: str) -> Any:
    try:
        return msgspec.convert(value, type_, dec_hook=_dec_hook)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{where}: {_name_key(str(exc), dotted)}") from None


_UNKNOWN = re.compile(r"Object contains unknown field `([^`]*)`")


def _name_key(message: str, prefix: str) -> str:
    """Turn msgspec's "... - at `$.port`" into "key servers.isp.port: ..."."""
    text, sep, path = message.rpartition(" - at `")
    if not sep:
        text, path = message, ""
    key = path.rstrip("`").removeprefix("$").lstrip(".")
    full = f"{prefix}.{key}" if key else prefix
    unknown = _UNKNOWN.match(text)
    if unknown:
        return f"unknown key {full}.{unknown[1]}"
    return f"key {full}: {text}"


_TOP_LEVEL = {"daemon", "delivery", "servers", "patterns", "suppression"}


def load_config(path: str | os.PathLike[str] | None) -> Config:
    raw: dict[str, Any] = {}
    where = str(path) if path else "<built-in defaults>"
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"{where}: cannot read config: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{where}: invalid TOML: {exc}") from None
    unknown = sorted(set(raw) - _TOP_LEVEL)
    if unknown:
        raise ConfigError(f"{where}: unknown section [{unknown[0]}]")
    servers_raw = raw.get("servers", {})
    if not isinstance(servers_raw, dict):
        raise ConfigError(f"{where}: [servers] must be a table of [servers.NAME] tables")
    servers = {
        name: _section(value, f"servers.{name}", ServerConfig, where)
        for name, value in servers_raw.items()
    }
    config = Config(
        daemon=_section(raw.get("daemon", {}), "daemon", DaemonConfig, where),
        delivery=_section(raw.get("delivery", {}), "delivery", DeliveryConfig, where),
        patterns=_section(raw.get("patterns", {}), "patterns", PatternConfig, where),
        suppression=_section(raw.get("suppression", {}), "suppression", SuppressionConfig, where),
        servers=servers,
        path=str(path) if path else None,
    )
    _check_values(config, where)
    return config


def _check_values(config: Config, where: str) -> None:
    problems = [f"servers.{name}.{p}" for name, s in config.servers.items()
                for p in server_problems(s)]
    bad_pattern = validate_patterns(config.patterns)
    if bad_pattern:
        problems.append(bad_pattern)
    if config.daemon.socket_group:
        from mailerd.control.access import resolve_group

        try:
            resolve_group(config.daemon.socket_group)
        except ValueError as exc:
            problems.append(f"daemon.socket_group: {exc}")
    if config.daemon.socket_mode is not None and not 0 <= config.daemon.socket_mode <= 0o777:
        problems.append("daemon.socket_mode must be a file mode such as 0o660")
    for name, server in config.servers.items():
        if not 1 <= server.port <= 65535:
            problems.append(f"servers.{name}.port must be between 1 and 65535")
        if server.password_file and not server.username:
            problems.append(f"servers.{name}.password_file needs servers.{name}.username")
        dkim_keys = (server.dkim_domain, server.dkim_selector, server.dkim_key_file)
        if any(dkim_keys) and not all(dkim_keys):
            problems.append(f"servers.{name}: dkim_domain, dkim_selector and dkim_key_file "
                            "go together")
        problems += _dkim_domains_problems(name, server)
        if server.timeout <= 0:
            problems.append(f"servers.{name}.timeout must be positive")
    if config.delivery.max_attempts < 1:
        problems.append("delivery.max_attempts must be at least 1")
    if config.delivery.retry_max < config.delivery.retry_initial:
        problems.append("delivery.retry_max must not be less than delivery.retry_initial")
    for i, pattern in enumerate(config.suppression.bounce_patterns):
        try:
            re.compile(pattern)
        except re.error as exc:
            problems.append(f"suppression.bounce_patterns[{i}]: {exc}")
    if problems:
        raise ConfigError(f"{where}: {problems[0]}")


def _dkim_domains_problems(name: str, server: ServerConfig) -> list[str]:
    if server.dkim_domains is None:
        return []
    if not server.dkim_key_file:
        return [f"servers.{name}.dkim_domains needs servers.{name}.dkim_key_file"]
    return [f"servers.{name}.dkim_domains: {domain!r} is not a domain name"
            for domain in server.dkim_domains
            if not domain.strip(" .") or "@" in domain or any(c.isspace() for c in domain.strip())]


def server_problems(server: ServerConfig) -> list[str]:
    """Pacing values that parse but make no sense, as 'key: why' strings."""
    problems = []
    for key in ("group_size", "messages_per_connection", "hourly_quota", "daily_quota"):
        if getattr(server, key) < 0:
            problems.append(f"{key} must not be negative")
    if server.rate is not None:
        from mailerd.pacing.pacer import parse_rate

        try:
            parse_rate(server.rate)
        except ValueError as exc:
            problems.append(f"rate: {exc}")
    if server.group_size and not server.group_interval:
        problems.append("group_size needs group_interval")
    if not 1 <= server.connections <= 256:
        problems.append("connections must be between 1 and 256")
    return problems


def apply_setting(server: ServerConfig, key: str, value: str) -> ServerConfig:
    """A copy of `server` with one pacing key set from text (as `mailerctl set` gives it)."""
    if key not in PACING_KEYS:
        raise ConfigError(f"{key} cannot be changed at run time (keys: {', '.join(PACING_KEYS)})")
    raw = msgspec.to_builtins(server, enc_hook=float)
    raw[key] = _setting_value(key, value)
    try:
        updated = msgspec.convert(raw, ServerConfig, dec_hook=_dec_hook)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{key}={value}: {_name_key(str(exc), key)}") from None
    problems = server_problems(updated)
    if problems:
        raise ConfigError(problems[0])
    return updated


def _setting_value(key: str, value: str) -> object:
    field_type = ServerConfig.__annotations__[key]
    if value.lower() in ("none", "off", "") and "None" in field_type:
        return None
    if field_type == "int":
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{key}={value}: expected a whole number") from None
    return value


def read_password(server_name: str, server: ServerConfig) -> str | None:
    """Read a relay password from its file; $CREDENTIALS_DIRECTORY is expanded."""
    if not server.password_file:
        return None
    path = os.path.expandvars(server.password_file)
    try:
        return Path(path).read_text(encoding="utf-8").strip("\r\n")
    except OSError as exc:
        raise ConfigError(
            f"servers.{server_name}.password_file: cannot read {path}: {exc.strerror}"
        ) from None
