"""/v1/models: offline resolution through the model store."""

from __future__ import annotations

from fastapi.testclient import TestClient


def test_register_known_model_then_idempotent(client: TestClient, auth: dict[str, str], model_store) -> None:
    r = client.post("/v1/models", json={"model_id": "tiny/llama"}, headers=auth)
    assert r.status_code in (200, 201), r.text
    body = r.json()
    assert body["model_id"] == "tiny/llama"
    assert body["kind"] == "causal_lm"
    assert body["resolved_path"] == str(model_store / "tiny" / "llama")
    again = client.post("/v1/models", json={"model_id": "tiny/llama"}, headers=auth)
    assert again.status_code == 200
    listed = client.get("/v1/models", headers=auth).json()
    assert "tiny/llama" in [m["model_id"] for m in listed["items"]]
    assert "tiny/llama" in listed["available"]


def test_unknown_model_is_404(client: TestClient, auth: dict[str, str]) -> None:
    r = client.post("/v1/models", json={"model_id": "nobody/nothing-here"}, headers=auth)
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "model_not_found"
    assert "nobody/nothing-here" in r.json()["error"]["message"]


def test_model_id_field_named_in_422(client: TestClient, auth: dict[str, str]) -> None:
    r = client.post("/v1/models", json={"model": "x"}, headers=auth)
    assert r.status_code == 422
    fields = {d["field"] for d in r.json()["error"]["details"]}
    assert "model_id" in fields
