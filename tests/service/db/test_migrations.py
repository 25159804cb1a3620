"""Alembic: upgrade -> downgrade -> upgrade on PostgreSQL (fresh database) and SQLite; the schema
matches the ORM models; the startup policy (auto-migrate or refuse)."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from service.db.migrate import SchemaNotCurrent, current_revision, downgrade, ensure_schema, head_revision, upgrade
from service.db.models import Base
from service.db.session import make_engine
from service.testing import fresh_postgres_database

TABLES = {"api_keys", "models", "recipes", "jobs", "artifacts", "metrics"}


def _roundtrip(url: str) -> None:
    engine = make_engine(url)
    try:
        assert current_revision(engine) is None
        upgrade(engine)
        assert current_revision(engine) == head_revision()
        assert TABLES <= set(inspect(engine).get_table_names())
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        assert diff == [], diff
        downgrade(engine, "base")
        assert current_revision(engine) is None
        assert not TABLES & set(inspect(engine).get_table_names())
        upgrade(engine)
        assert TABLES <= set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_roundtrip_postgresql(pg_admin_url: str) -> None:
    with fresh_postgres_database(pg_admin_url, prefix="qaas_mig") as url:
        _roundtrip(url)


def test_roundtrip_sqlite(tmp_path: Path) -> None:
    _roundtrip(f"sqlite:///{tmp_path / 'm.db'}")


def test_refuses_to_start_behind_head_unless_auto_migrate(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'r.db'}")
    with pytest.raises(SchemaNotCurrent, match="alembic upgrade head"):
        ensure_schema(engine, auto_migrate=False)
    ensure_schema(engine, auto_migrate=True)
    ensure_schema(engine, auto_migrate=False)  # at head now: accepted
    engine.dispose()
