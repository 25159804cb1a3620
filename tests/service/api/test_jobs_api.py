"""/v1/jobs against real PostgreSQL and Redis: submission, idempotency, routing, listing, cancel,
retry, limits and error bodies."""

from __future__ import annotations

import json

import redis
from fastapi.testclient import TestClient

JOB = {"model_id": "tiny/llama", "preset": "rtn-w8a8"}


def _queued_task_ids(redis_client: redis.Redis, queue: str) -> set[str]:
    return {json.loads(m)["headers"]["id"] for m in redis_client.lrange(queue, 0, -1)}


def _job_task_id(settings, job_id: str) -> str:  # type: ignore[no-untyped-def]
    from sqlalchemy import create_engine

    from service.db.models import Job
    from service.db.session import make_session_factory

    engine = create_engine(settings.database_url)
    with make_session_factory(engine)() as s:
        job = s.get(Job, job_id)
        assert job is not None and job.celery_task_id
        task_id = job.celery_task_id
    engine.dispose()
    return task_id


def test_submit_enqueues_on_the_device_queue(client: TestClient, auth, settings, redis_client) -> None:
    r = client.post("/v1/jobs", json=JOB, headers=auth)
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["state"] == "queued" and job["progress"] == 0 and job["attempts"] == 0
    assert job["recipe_name"] == "rtn-w8a8" and job["recipe"]["method"]["name"] == "rtn"
    assert r.headers["location"].endswith(f"/v1/jobs/{job['id']}")
    assert _job_task_id(settings, job["id"]) in _queued_task_ids(redis_client, "cpu")

    r = client.post("/v1/jobs", json={**JOB, "device": "cuda"}, headers=auth)
    assert r.status_code == 201
    gpu_job = r.json()
    assert gpu_job["device"] == "cuda"
    assert _job_task_id(settings, gpu_job["id"]) in _queued_task_ids(redis_client, "gpu")


def test_recipe_object_and_user_recipe(client: TestClient, auth) -> None:
    recipe = {"name": "inline", "method": {"name": "gptq"}, "weight": {"bits": 4, "algorithm": "gptq"}}
    r = client.post("/v1/jobs", json={"model_id": "tiny/llama", "recipe": recipe}, headers=auth)
    assert r.status_code == 201, r.text
    assert r.json()["recipe"]["weight"]["bits"] == 4
    assert client.post("/v1/recipes", json={"name": "saved-one", "recipe": recipe}, headers=auth).status_code == 201
    r = client.post("/v1/jobs", json={"model_id": "tiny/llama", "preset": "saved-one"}, headers=auth)
    assert r.status_code == 201 and r.json()["recipe_name"] == "saved-one"


def test_idempotency_key_returns_the_same_job(client: TestClient, auth, other_auth) -> None:
    headers = {**auth, "Idempotency-Key": "abc-123"}
    first = client.post("/v1/jobs", json=JOB, headers=headers)
    assert first.status_code == 201
    again = client.post("/v1/jobs", json=JOB, headers=headers)
    assert again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    assert again.json()["idempotency_key"] == "abc-123"
    conflict = client.post("/v1/jobs", json={**JOB, "preset": "rtn-w4a8"}, headers=headers)
    assert conflict.status_code == 409
    assert conflict.json()["error"]["code"] == "idempotency_conflict"
    # keys are scoped per API key: the same header value from another key is a new job
    other = client.post("/v1/jobs", json=JOB, headers={**other_auth, "Idempotency-Key": "abc-123"})
    assert other.status_code == 201 and other.json()["id"] != first.json()["id"]


def test_list_filters_and_cursor_pagination(client: TestClient, auth) -> None:
    ids = [client.post("/v1/jobs", json=JOB, headers=auth).json()["id"] for _ in range(5)]
    cancelled = ids[1]
    assert client.post(f"/v1/jobs/{cancelled}/cancel", headers=auth).json()["state"] == "cancelled"
    seen, cursor = [], None
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = client.get("/v1/jobs", params=params, headers=auth).json()
        assert len(page["items"]) <= 2
        seen += [j["id"] for j in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(ids))  # newest first, each exactly once
    only = client.get("/v1/jobs", params={"state": "cancelled"}, headers=auth).json()["items"]
    assert [j["id"] for j in only] == [cancelled]
    assert client.get("/v1/jobs", params={"model_id": "other/model"}, headers=auth).json()["items"] == []
    bad = client.get("/v1/jobs", params={"state": "exploded"}, headers=auth)
    assert bad.status_code == 422 and bad.json()["error"]["details"][0]["field"] == "state"
    bad = client.get("/v1/jobs", params={"cursor": "!!!"}, headers=auth)
    assert bad.status_code == 422 and bad.json()["error"]["details"][0]["field"] == "cursor"


def test_cancel_and_retry(client: TestClient, auth, settings, redis_client) -> None:
    job = client.post("/v1/jobs", json=JOB, headers=auth).json()
    first_task = _job_task_id(settings, job["id"])
    assert client.post(f"/v1/jobs/{job['id']}/retry", headers=auth).status_code == 409  # queued: nothing to retry
    r = client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth)
    assert r.status_code == 200 and r.json()["state"] == "cancelled" and r.json()["finished_at"]
    assert client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth).json()["state"] == "cancelled"
    r = client.post(f"/v1/jobs/{job['id']}/retry", headers=auth)
    assert r.status_code == 200, r.text
    assert r.json()["state"] == "queued" and r.json()["attempts"] == 0 and r.json()["finished_at"] is None
    second_task = _job_task_id(settings, job["id"])
    assert second_task != first_task
    assert second_task in _queued_task_ids(redis_client, "cpu")


def test_metrics_and_artifact_before_success(client: TestClient, auth) -> None:
    job = client.post("/v1/jobs", json=JOB, headers=auth).json()
    assert client.get(f"/v1/jobs/{job['id']}/metrics", headers=auth).json() == {"job_id": job["id"], "metrics": {}}
    r = client.get(f"/v1/jobs/{job['id']}/artifact", headers=auth)
    assert r.status_code == 409 and r.json()["error"]["code"] == "no_artifact"
    assert client.get("/v1/jobs/does-not-exist", headers=auth).status_code == 404


def test_bad_submissions_name_the_field(client: TestClient, auth) -> None:
    cases = [
        ({"model_id": "tiny/llama"}, 422, None),  # neither recipe nor preset
        ({"model_id": "tiny/llama", "preset": "no-such-preset"}, 422, "preset"),
        ({"model_id": "tiny/llama", "recipe": {"method": {"name": "rtn"}, "activation": {"bits": 3}}}, 422,
         "recipe.activation"),
        ({"model_id": "tiny/llama", "preset": "rtn-w8a8", "device": "tpu"}, 422, "device"),
        ({"preset": "rtn-w8a8"}, 422, "model_id"),
        ({"model_id": "ghost/model", "preset": "rtn-w8a8"}, 404, None),
    ]
    for body, status, field in cases:
        r = client.post("/v1/jobs", json=body, headers=auth)
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert err["code"] and err["message"]
        if field is not None:
            assert field in [d["field"] for d in err["details"]], (field, err)


def test_bodies_over_the_limit_are_413(client: TestClient, auth, settings) -> None:
    big = {"model_id": "tiny/llama", "preset": "rtn-w8a8", "recipe": {"pad": "x" * (settings.max_body_bytes + 10)}}
    r = client.post("/v1/jobs", content=json.dumps(big), headers={**auth, "Content-Type": "application/json"})
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "payload_too_large"

    def chunks():  # no Content-Length: the streamed size is what trips the limit
        yield b'{"model_id": "tiny/llama", "recipe": {"pad": "'
        for _ in range(settings.max_body_bytes // 4096 + 2):
            yield b"y" * 4096
        yield b'"}}'

    r = client.post("/v1/jobs", content=chunks(), headers={**auth, "Content-Type": "application/json"})
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "payload_too_large"


def test_openapi_documents_examples_and_errors(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    post = spec["paths"]["/v1/jobs"]["post"]
    assert {"401", "404", "413", "422"} <= set(post["responses"])
    schema = spec["components"]["schemas"]["JobCreate"]
    assert schema["examples"][0]["preset"]
    assert "Idempotency-Key" in [p["name"] for p in post["parameters"]]
