"""The app factory on the embedded default (SQLite): startup policy, auth switch, mounted routers."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.db.migrate import SchemaNotCurrent
from service.settings import Settings


class NullDispatcher:
    def __init__(self) -> None:
        self.enqueued: list[str] = []

    def enqueue(self, job_id: str, task_id: str, device: str) -> None:
        self.enqueued.append(job_id)

    def revoke(self, task_id: str) -> None:
        return None


def _settings(tmp_path: Path, **overrides) -> Settings:  # type: ignore[no-untyped-def]
    return Settings(database_url=f"sqlite:///{tmp_path / 'var' / 'q.db'}", artifact_dir=tmp_path / "art",
                    model_store=tmp_path / "store", **overrides)


def test_refuses_to_start_on_an_unmigrated_database(tmp_path: Path) -> None:
    app = create_app(_settings(tmp_path, auto_migrate=False), dispatcher=NullDispatcher())
    with pytest.raises(SchemaNotCurrent, match="needs 0001"):
        with TestClient(app):
            pass


def test_auth_disabled_acts_as_one_anonymous_owner(tmp_path: Path) -> None:
    dispatcher = NullDispatcher()
    app = create_app(_settings(tmp_path, auth_enabled=False), dispatcher=dispatcher)
    with TestClient(app) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        recipe = {"method": {"name": "rtn"}}
        assert client.post("/v1/recipes", json={"name": "r1", "recipe": recipe}).status_code == 201
        names = [i["name"] for i in client.get("/v1/recipes").json()["items"] if i["source"] == "user"]
        assert names == ["r1"]
        assert client.get("/v1/jobs").json() == {"items": [], "next_cursor": None}
    assert (tmp_path / "var" / "q.db").exists() and (tmp_path / "art").is_dir()


def test_optional_routers_are_mounted(tmp_path: Path) -> None:
    app = create_app(_settings(tmp_path), dispatcher=NullDispatcher())
    paths = set(app.openapi()["paths"])
    assert {"/v1/jobs", "/v1/models", "/v1/recipes", "/v1/recipes/validate", "/healthz"} <= paths
    assert "/v1/completions" in paths  # service.inference.router
    with TestClient(app) as client:
        assert client.get("/dashboard").status_code == 200  # service.dashboard.router
