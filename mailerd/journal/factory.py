"""The journal the configuration asks for: `[journal] backend` is "sqlite" or "postgresql".

psycopg is imported only when the configuration names PostgreSQL, so a daemon on SQLite
never loads it.
"""

from __future__ import annotations

import os
from pathlib import Path

from mailerd.journal.backend import JournalError, JournalStore
from mailerd.journal.store import Journal
from mailerd.schema.config import JournalConfig

JOURNAL_FILE = "journal.sqlite3"  # in the state directory, with backend = "sqlite"


def open_store(config: JournalConfig, state_dir: Path, synchronous: str = "full") -> JournalStore:
    """The configured journal, not yet opened (`.open()` returns the Recovery).
    `synchronous` is [daemon] journal_sync, for SQLite (PostgreSQL always commits to disk)."""
    if config.backend == "sqlite":
        return Journal(state_dir / JOURNAL_FILE, synchronous, host_id=config.host)
    # only here: SQLite users never load psycopg
    from mailerd.journal.postgres import PgJournal, instance_name

    assert config.dsn is not None  # JournalConfig requires it for postgresql
    return PgJournal(config.dsn, config.host, config.lease, read_db_password(config),
                     instance=instance_name(state_dir))


def check_store(config: JournalConfig) -> None:
    """`--check-config`: JournalError unless the configured database can be used. Changes
    nothing (no host registered: a running daemon with the same host id is not fenced)."""
    if config.backend == "sqlite":
        return
    from mailerd.journal.postgres import PgJournal

    assert config.dsn is not None
    PgJournal(config.dsn, config.host, config.lease, read_db_password(config)).check()


def read_db_password(config: JournalConfig) -> str | None:
    """The password in `password_file` (`$CREDENTIALS_DIRECTORY` is expanded; a bare name
    is a systemd credential there), or None."""
    if not config.password_file:
        return None
    path = os.path.expandvars(config.password_file)
    credentials = os.environ.get("CREDENTIALS_DIRECTORY")
    if "/" not in path and credentials:
        path = os.path.join(credentials, path)
    try:
        return Path(path).read_text(encoding="utf-8").strip("\r\n")
    except OSError as exc:
        raise JournalError(f"key journal.password_file: cannot read {path}: {exc.strerror}") from None
