"""API-key authentication and per-key isolation (foreign resources answer 404)."""

from __future__ import annotations

import logging

from fastapi.testclient import TestClient
from sqlalchemy import create_engine, select

from service.db.models import ApiKey
from service.logging_setup import RedactSecrets
from service.settings import Settings

JOB = {"model_id": "tiny/llama", "preset": "rtn-w8a8"}


def test_missing_key_is_401_with_error_body(client: TestClient) -> None:
    r = client.get("/v1/jobs")
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "unauthorized"
    assert "missing API key" in r.json()["error"]["message"]
    assert r.headers["www-authenticate"] == "Bearer"


def test_invalid_key_is_401(client: TestClient, auth: dict[str, str]) -> None:
    good = auth["X-API-Key"]
    forged = good[:-4] + ("AAAA" if not good.endswith("AAAA") else "BBBB")
    for headers in ({"X-API-Key": "nonsense"}, {"X-API-Key": forged}, {"Authorization": "Bearer " + forged},
                    {"Authorization": "Basic abc"}):
        r = client.get("/v1/jobs", headers=headers)
        assert r.status_code == 401, headers
        assert r.json()["error"]["code"] == "unauthorized"


def test_bearer_and_header_both_work(client: TestClient, auth: dict[str, str]) -> None:
    key = auth["X-API-Key"]
    assert client.get("/v1/jobs", headers={"X-API-Key": key}).status_code == 200
    assert client.get("/v1/jobs", headers={"Authorization": f"Bearer {key}"}).status_code == 200


def test_key_stored_only_as_salted_hash(client: TestClient, settings: Settings, auth: dict[str, str]) -> None:
    key = auth["X-API-Key"]
    engine = create_engine(settings.database_url)
    with engine.connect() as conn:
        rows = conn.execute(select(ApiKey.key_id, ApiKey.salt, ApiKey.secret_hash)).all()
    engine.dispose()
    secret = key.split("_", 2)[2]
    assert rows and all(secret not in (r.salt + r.secret_hash) for r in rows)
    assert len({r.salt for r in rows}) == len(rows)  # a distinct salt per key


def test_foreign_job_is_404_everywhere(client: TestClient, auth: dict[str, str], other_auth: dict[str, str]) -> None:
    r = client.post("/v1/jobs", json=JOB, headers=auth)
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    for method, path in [("GET", f"/v1/jobs/{job_id}"), ("POST", f"/v1/jobs/{job_id}/cancel"),
                         ("POST", f"/v1/jobs/{job_id}/retry"), ("GET", f"/v1/jobs/{job_id}/metrics"),
                         ("GET", f"/v1/jobs/{job_id}/artifact")]:
        r = client.request(method, path, headers=other_auth)
        assert r.status_code == 404, (path, r.text)
        assert r.json()["error"]["code"] == "not_found"
    listed = client.get("/v1/jobs", headers=other_auth).json()["items"]
    assert job_id not in {j["id"] for j in listed}
    assert client.get(f"/v1/jobs/{job_id}", headers=auth).status_code == 200


def test_admin_routes_need_the_admin_token(client: TestClient, auth: dict[str, str]) -> None:
    r = client.post("/v1/admin/api-keys", json={"owner": "x"}, headers={"X-Admin-Token": "wrong"})
    assert r.status_code == 401
    r = client.post("/v1/admin/api-keys", json={"owner": "x"}, headers=auth)
    assert r.status_code == 401


def test_admin_reap_endpoint_reports(client: TestClient, settings: Settings) -> None:
    assert settings.admin_token is not None
    r = client.post("/v1/admin/reap", headers={"X-Admin-Token": settings.admin_token.get_secret_value()})
    assert r.status_code == 200, r.text
    assert set(r.json()) == {"expired", "requeued", "exhausted"}
    assert all(isinstance(v, list) for v in r.json().values())
    assert client.post("/v1/admin/reap").status_code == 401


def test_log_filter_redacts_keys(auth: dict[str, str]) -> None:
    key = auth["X-API-Key"]
    record = logging.LogRecord("t", logging.INFO, __file__, 1, "got header %s", (key,), None)
    RedactSecrets().filter(record)
    assert key not in record.getMessage()
    assert "qaas_***" in record.getMessage()
