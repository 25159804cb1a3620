"""Worker test fixtures: a fresh, migrated PostgreSQL database per session, real Redis, a model store."""

from __future__ import annotations

import importlib.util
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from sqlalchemy.orm import Session, sessionmaker

from service.db.migrate import upgrade
from service.db.session import make_engine, make_session_factory
from service.settings import Settings
from service.testing import fresh_postgres_database

PG_ADMIN_URL = os.environ.get("QAAS_TEST_DATABASE_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("QAAS_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


def root_conftest():  # type: ignore[no-untyped-def]
    """tests/conftest.py (tiny-model factories) loaded by path."""
    path = Path(__file__).resolve().parents[1] / "conftest.py"
    spec = importlib.util.spec_from_file_location("qaas_root_conftest_workers", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tiny_factories():  # type: ignore[no-untyped-def]
    return root_conftest()


@pytest.fixture(scope="session")
def worker_pg_url() -> Iterator[str]:
    with fresh_postgres_database(PG_ADMIN_URL, prefix="qaas_wrk") as url:
        engine = make_engine(url)
        upgrade(engine)
        engine.dispose()
        yield url


@pytest.fixture(scope="session")
def worker_redis() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL)
    client.ping()
    yield client
    client.close()


@pytest.fixture(scope="session")
def worker_settings(worker_pg_url: str, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return Settings(
        database_url=worker_pg_url,
        redis_url=REDIS_URL,
        artifact_dir=tmp_path_factory.mktemp("worker_artifacts"),
        model_store=tmp_path_factory.mktemp("worker_store"),
        heartbeat_seconds=0.2,
        heartbeat_stale_seconds=2.0,
        progress_min_interval_seconds=0.0,
        admin_token="adm-" + uuid.uuid4().hex,
    )


@pytest.fixture(scope="session")
def factory(worker_settings: Settings) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(worker_settings.database_url)
    yield make_session_factory(engine)
    engine.dispose()
