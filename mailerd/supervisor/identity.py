"""What the daemon hands its workers besides the campaign: the unsubscribe key and
the servers' DKIM keys, each read at start (or when a server first appears) and
again on every reload, never logged."""

from __future__ import annotations

import os
from pathlib import Path

from mailerd.message import tokens
from mailerd.config import ConfigError
from mailerd.schema.config import Config, ServerConfig
from mailerd.schema.control import DkimKey
from mailerd.message.signing import DkimKeyError, Signer


def read_server_dkim(name: str, server: ServerConfig) -> DkimKey | None:
    if not server.dkim_key_file:
        return None
    assert server.dkim_domain and server.dkim_selector
    path = os.path.expandvars(server.dkim_key_file)
    try:
        text = Path(path).read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        why = getattr(exc, "strerror", None) or "not a text key file"
        raise ConfigError(f"servers.{name}.dkim_key_file: cannot read {path}: {why}") from None
    key = DkimKey(domain=server.dkim_domain, selector=server.dkim_selector, key=text)
    try:
        Signer(key.domain, key.selector, key.key)
    except DkimKeyError as exc:
        raise ConfigError(f"servers.{name}.dkim_key_file: {path}: {exc}") from None
    return key


class Identity:
    def __init__(self, config: Config) -> None:
        try:
            self.unsubscribe_key = tokens.load_or_create_key(config.state_dir)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot use {config.state_dir / tokens.KEY_FILE}: {exc}") from None
        self._dkim = _read_all_dkim(config)

    def server_dkim(self, name: str, server: ServerConfig) -> DkimKey | None:
        """The server's key, read the first time this server is seen (and on reload)."""
        if name not in self._dkim:
            self._dkim[name] = (read_server_dkim(name, server), server.dkim_domains)
        return self._dkim[name][0]

    def reload(self, config: Config) -> set[str]:
        """SIGHUP: every server's key read again, so a key rotated on disk is used from
        now on. The servers whose key or dkim_domains changed (their workers hold the
        old ones). ConfigError, and nothing changed, if a key cannot be used."""
        fresh = _read_all_dkim(config)
        changed = {name for name, held in self._dkim.items()
                   if name in fresh and fresh[name] != held}
        self._dkim = fresh
        return changed


def _read_all_dkim(config: Config) -> dict[str, tuple[DkimKey | None, list[str] | None]]:
    return {name: (read_server_dkim(name, server), server.dkim_domains)
            for name, server in config.servers.items()}
