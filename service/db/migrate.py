"""Schema migrations at startup.

Policy (documented in docs/SERVICE.md): by default the API process runs ``alembic upgrade head``
before serving (``QAAS_AUTO_MIGRATE=true``); on PostgreSQL this happens under an advisory lock
so that several replicas starting together migrate once. With ``QAAS_AUTO_MIGRATE=false`` the app
refuses to start, with :class:`SchemaNotCurrent` naming both revisions, unless the database is
already at head. Workers never migrate; they check and refuse the same way.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, text

REPO_ROOT = Path(__file__).resolve().parents[2]
ALEMBIC_INI = REPO_ROOT / "alembic.ini"
MIGRATIONS_DIR = REPO_ROOT / "migrations"
_PG_LOCK_KEY = 0x51AA5  # arbitrary constant advisory-lock key for migrations


class SchemaNotCurrent(RuntimeError):
    pass


def alembic_config(database_url: str | None = None) -> Config:
    cfg = Config(str(ALEMBIC_INI)) if ALEMBIC_INI.exists() else Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["configure_logging"] = False
    if database_url:
        cfg.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return cfg


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> None:
    cfg = alembic_config()
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK_KEY})
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


def downgrade(engine: Engine, revision: str = "base") -> None:
    cfg = alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, revision)


def ensure_schema(engine: Engine, auto_migrate: bool) -> None:
    """Migrate to head, or raise :class:`SchemaNotCurrent` with a clear message."""
    if auto_migrate:
        upgrade(engine)
        return
    current, head = current_revision(engine), head_revision()
    if current != head:
        raise SchemaNotCurrent(
            f"database schema is at revision {current or '<empty>'} but this build needs {head}; "
            "run `alembic upgrade head` (or `python -m service.cli migrate`) or set QAAS_AUTO_MIGRATE=true"
        )
