"""What the daemon hands its workers besides the campaign: the unsubscribe key and
the servers' DKIM keys, each read once (at start, or when a server first appears)
and never logged."""

from __future__ import annotations

import os
from pathlib import Path

from mailerd.message import tokens
from mailerd.config import ConfigError
from mailerd.schema.config import Config, ServerConfig
from mailerd.schema.control import DkimKey
from mailerd.message.signing import KeyError_, Signer


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
    except KeyError_ as exc:
        raise ConfigError(f"servers.{name}.dkim_key_file: {path}: {exc}") from None
    return key


class Identity:
    def __init__(self, config: Config) -> None:
        try:
            self.unsubscribe_key = tokens.load_or_create_key(config.state_dir)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot use {config.state_dir / tokens.KEY_FILE}: {exc}") from None
        self._dkim: dict[tuple[str, str | None], DkimKey | None] = {}
        for name, server in config.servers.items():
            self.server_dkim(name, server)

    def server_dkim(self, name: str, server: ServerConfig) -> DkimKey | None:
        """The server's key, read the first time this server (with this key file) is seen."""
        cache_key = (name, server.dkim_key_file)
        if cache_key not in self._dkim:
            self._dkim[cache_key] = read_server_dkim(name, server)
        return self._dkim[cache_key]
