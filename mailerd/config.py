"""The configuration loader: a TOML file decoded into schema/config.py's Structs.

Every error names the file and the key (`servers.isp.port`), and is raised before
anything starts. The Structs check their own values while decoding; this module
reads the file, turns msgspec's path into the key's name, checks what needs the
system (the socket group), applies `mailerctl set` and reads relay passwords.
"""

from __future__ import annotations

import grp
import os
import re
import ssl
import tomllib
from pathlib import Path
from typing import Any

import msgspec

from mailerd.schema.config import (
    PACING_KEYS,
    BouncesConfig,
    Config,
    DaemonConfig,
    DeliveryConfig,
    JournalConfig,
    MailboxConfig,
    PatternConfig,
    ServerConfig,
    SuppressionConfig,
    decode_hook,
    shorten,
)


class ConfigError(Exception):
    pass


def _section(value: Any, dotted: str, type_: type, where: str) -> Any:
    try:
        return msgspec.convert(value, type_, dec_hook=decode_hook)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{where}: {_name_key(str(exc), dotted)}") from None


_UNKNOWN = re.compile(r"Object contains unknown field `([^`]*)`")
_PROBLEM = re.compile(r"`([^`]+)`: (.*)", re.DOTALL)  # schema.config.problem(field, why)


def _name_key(message: str, prefix: str) -> str:
    """Turn msgspec's "... - at `$.port`" into "key servers.isp.port: ..."."""
    text, sep, path = message.rpartition(" - at `")
    if not sep:
        text, path = message, ""
    keys = [prefix, path.rstrip("`").removeprefix("$").lstrip(".")]
    unknown = _UNKNOWN.match(text)
    if unknown:
        return f"unknown key {_dotted(*keys, unknown[1])}"
    field_problem = _PROBLEM.fullmatch(text)
    if field_problem:
        return f"key {_dotted(*keys, field_problem[1])}: {field_problem[2]}"
    return f"key {_dotted(*keys)}: {text}"


def _dotted(*parts: str) -> str:
    return ".".join(part for part in parts if part)


_TOP_LEVEL = {"daemon", "delivery", "servers", "patterns", "suppression", "bounces", "journal"}


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
        bounces=_bounces_section(raw.get("bounces", {}), where),
        journal=_section(raw.get("journal", {}), "journal", JournalConfig, where),
        servers=servers,
        path=str(path) if path else None,
    )
    _check_groups(config, where)
    _check_ca_files(config, where)
    return config


def _bounces_section(raw: Any, where: str) -> BouncesConfig:
    """[bounces], each [bounces.mailboxes.NAME] decoded on its own so an error names it."""
    if not isinstance(raw, dict) or not isinstance(raw.get("mailboxes", {}), dict):
        raise ConfigError(f"{where}: [bounces] must be a table, with [bounces.mailboxes.NAME] tables")
    mailboxes = {name: _section(value, f"bounces.mailboxes.{name}", MailboxConfig, where)
                 for name, value in raw.get("mailboxes", {}).items()}
    rest = {key: value for key, value in raw.items() if key != "mailboxes"}
    return msgspec.structs.replace(_section(rest, "bounces", BouncesConfig, where), mailboxes=mailboxes)


def _check_groups(config: Config, where: str) -> None:
    """The one check the Structs cannot make: it asks the system's group database."""
    for key in ("socket_group", "admin_group"):
        name = getattr(config.daemon, key)
        if not name:
            continue
        try:
            resolve_group(name)
        except ValueError as exc:
            raise ConfigError(f"{where}: key daemon.{key}: {exc}") from None


def _check_ca_files(config: Config, where: str) -> None:
    """Each server's tls_ca_file is read now, so a bad one is a config error, not a failed send."""
    for name, server in config.servers.items():
        if server.tls_ca_file:
            problem = ca_file_problem(os.path.expandvars(server.tls_ca_file))
            if problem:
                raise ConfigError(f"{where}: key servers.{name}.tls_ca_file: {problem}")


def ca_file_problem(path: str) -> str | None:
    """Why a PEM bundle cannot be used to verify relays, or None."""
    try:
        ssl.create_default_context(cafile=path)
    except FileNotFoundError:
        return f"cannot read {path}: no such file"
    except PermissionError:
        return f"cannot read {path}: permission denied"
    except (ssl.SSLError, ValueError, OSError) as exc:
        return f"{path} is not a PEM bundle of CA certificates ({exc})"
    return None


def resolve_group(name: str) -> int:
    """The gid of a group name (or a number); ValueError names what is wrong."""
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        if name.isdigit():
            return int(name)
        raise ValueError(f"no group named {name!r}") from None


def apply_setting(server: ServerConfig, key: str, value: str) -> ServerConfig:
    """A copy of `server` with one pacing key set from text (as `mailerctl set` gives it)."""
    if key not in PACING_KEYS:
        raise ConfigError(f"{key} cannot be changed at run time (keys: {', '.join(PACING_KEYS)})")
    raw = msgspec.to_builtins(server, enc_hook=float)
    raw[key] = _setting_value(key, value)
    try:
        return msgspec.convert(raw, ServerConfig, dec_hook=decode_hook)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{key}={shorten(value)}: {_name_key(str(exc), '')}") from None


_SERVER_FIELDS = {field.name: field.type
                  for field in msgspec.inspect.type_info(ServerConfig).fields}


def _setting_value(key: str, value: str) -> object:
    field_type = _SERVER_FIELDS[key]
    nullable = isinstance(field_type, msgspec.inspect.UnionType) and any(
        isinstance(t, msgspec.inspect.NoneType) for t in field_type.types)
    if value.lower() in ("none", "off", "") and nullable:
        return None
    if isinstance(field_type, msgspec.inspect.IntType):
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{key}={shorten(value)}: expected a whole number") from None
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
