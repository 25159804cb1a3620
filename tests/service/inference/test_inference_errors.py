"""Error answers of the inference endpoints: 422 naming the field, 404, 409, 401, 400."""

from __future__ import annotations

import pytest


def _post(served, path: str, body: dict, owner: str | None = "alice", headers: dict | None = None):
    h = headers if headers is not None else (served.headers(owner) if owner else {})
    return served.client.post(path, json=body, headers=h)


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"temperature": 3.5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"n": 2}, "n"),
        ({"prompt": []}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"logit_bias": {}}, "logit_bias"),
        ({"stream": "sometimes"}, "stream"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"echo": True}, "echo"),
        ({"logprobs": 5}, "logprobs"),
        ({"stream_options": {"include_usage": True, "other": 1}}, "stream_options"),
    ],
)
def test_invalid_completion_fields_are_422_naming_the_field(served, patch: dict, field: str) -> None:
    body = {"model": served.jobs["llama"], "prompt": "hi", "max_tokens": 2, **patch}
    r = _post(served, "/v1/completions", body)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "validation_error"
    assert any(d["field"] == field or d["field"].startswith(field + ".") for d in error["details"]), error
    assert field in error["message"]


def test_missing_model_and_bad_embedding_format_are_422(served) -> None:
    r = _post(served, "/v1/completions", {"prompt": "hi"})
    assert r.status_code == 422 and r.json()["error"]["details"][0]["field"] == "model"
    r = _post(served, "/v1/embeddings", {"model": served.jobs["bert"], "input": "x", "encoding_format": "hex"})
    assert r.status_code == 422 and r.json()["error"]["details"][0]["field"] == "encoding_format"


def test_unknown_and_foreign_models_are_404(served) -> None:
    for name in ("f" * 32, "qaas/tiny-llama:nope", "no-colon-name"):
        r = _post(served, "/v1/completions", {"model": name, "prompt": "hi"})
        assert r.status_code == 404, r.text
        assert r.json()["error"]["code"] == "not_found"
    # bob's job exists and succeeded, but alice's key may not serve it; nor bob alice's
    assert _post(served, "/v1/completions", {"model": served.jobs["bob-llama"], "prompt": "hi"}).status_code == 404
    assert _post(served, "/v1/completions", {"model": served.jobs["llama"], "prompt": "hi"}, "bob").status_code == 404
    r = _post(served, "/v1/embeddings", {"model": served.jobs["bob-llama"], "input": "hi"})
    assert r.status_code == 404


def test_unfinished_job_is_409(served) -> None:
    r = _post(served, "/v1/completions", {"model": served.jobs["running"], "prompt": "hi"})
    assert r.status_code == 409
    assert "running" in r.json()["error"]["message"]


def test_missing_or_invalid_key_is_401(served) -> None:
    body = {"model": served.jobs["llama"], "prompt": "hi"}
    assert _post(served, "/v1/completions", body, owner=None).status_code == 401
    bad = {"Authorization": "Bearer qaas_0123456789abcdef_" + "x" * 43}
    assert _post(served, "/v1/completions", body, headers=bad).status_code == 401
    assert served.client.get("/v1/served-models").status_code == 401
    ok = {"Authorization": f"Bearer {served.keys['alice']}"}
    assert _post(served, "/v1/completions", {**body, "max_tokens": 1}, headers=ok).status_code == 200


def test_wrong_endpoint_for_the_model_kind_is_400(served) -> None:
    r = _post(served, "/v1/completions", {"model": served.jobs["bert"], "prompt": "hi"})
    assert r.status_code == 400 and "embeddings" in r.json()["error"]["message"]
    r = _post(served, "/v1/embeddings", {"model": served.jobs["llama"], "input": "hi"})
    assert r.status_code == 400


def test_prompt_longer_than_the_context_is_400(served) -> None:
    r = _post(served, "/v1/completions", {"model": served.jobs["llama"], "prompt": "x" * 300, "max_tokens": 1})
    assert r.status_code == 400 and "context" in r.json()["error"]["message"]
