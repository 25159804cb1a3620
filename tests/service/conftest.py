"""Service test fixtures: a fresh PostgreSQL database per test session, real Redis, the app."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings
from service.testing import fresh_postgres_database

PG_ADMIN_URL = os.environ.get("QAAS_TEST_DATABASE_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("QAAS_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
ADMIN_TOKEN = "test-admin-token-" + uuid.uuid4().hex


def root_conftest():  # type: ignore[no-untyped-def]
    """tests/conftest.py (tiny-model factories) as a module, whatever name pytest imported it under."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "conftest.py"
    spec = importlib.util.spec_from_file_location("qaas_root_conftest", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def pg_admin_url() -> str:
    return PG_ADMIN_URL


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    with fresh_postgres_database(PG_ADMIN_URL, prefix="qaas_svc") as url:
        yield url


@pytest.fixture(scope="session")
def redis_client() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL)
    client.ping()
    client.delete("cpu", "gpu")
    yield client
    client.delete("cpu", "gpu")
    client.close()


@pytest.fixture(scope="session")
def model_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model store holding one tiny random LLaMA as ``tiny/llama`` (config + weights)."""
    store = tmp_path_factory.mktemp("model_store")
    root_conftest().make_tiny_llama().save_pretrained(store / "tiny" / "llama")
    return store


@pytest.fixture(scope="session")
def settings(pg_url: str, redis_client: redis.Redis, model_store: Path,
             tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return Settings(
        database_url=pg_url,
        redis_url=REDIS_URL,
        artifact_dir=tmp_path_factory.mktemp("artifacts"),
        model_store=model_store,
        max_body_bytes=64 * 1024,
        admin_token=ADMIN_TOKEN,
        auth_enabled=True,
    )


@pytest.fixture(scope="session")
def client(settings: Settings) -> Iterator[TestClient]:
    app = create_app(settings)
    with TestClient(app) as c:
        yield c


def new_key(client: TestClient, owner: str = "tester") -> dict[str, str]:
    r = client.post("/v1/admin/api-keys", json={"owner": owner}, headers={"X-Admin-Token": ADMIN_TOKEN})
    assert r.status_code == 201, r.text
    return {"X-API-Key": r.json()["api_key"]}


@pytest.fixture
def auth(client: TestClient) -> dict[str, str]:
    return new_key(client, "alice")


@pytest.fixture
def other_auth(client: TestClient) -> dict[str, str]:
    return new_key(client, "mallory")
