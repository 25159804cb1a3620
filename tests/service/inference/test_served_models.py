"""GET /v1/served-models and the LRU bound of loaded models."""

from __future__ import annotations

from fastapi.testclient import TestClient

from service.db.models import JobState
from tests.service.inference.helpers import add_job, add_key, make_app, save_model_artifact


def test_lists_only_the_keys_succeeded_jobs(served) -> None:
    served.client.post("/v1/completions", headers=served.headers("alice"),
                       json={"model": served.jobs["llama"], "prompt": "hi", "max_tokens": 1})
    r = served.client.get("/v1/served-models", headers=served.headers("alice"))
    assert r.status_code == 200
    data = {m["job_id"]: m for m in r.json()["data"]}
    assert set(data) == {served.jobs["llama"], served.jobs["opt"], served.jobs["bert"]}
    llama = data[served.jobs["llama"]]
    assert llama["id"] == "qaas/tiny-llama:w4a8" and llama["object"] == "model"
    assert llama["base_model"] == "qaas/tiny-llama"
    assert llama["loaded"] is True and llama["kind"] == "causal"
    # not loaded yet: the kind comes from the artifact manifest stored with the job
    assert (data[served.jobs["opt"]]["loaded"], data[served.jobs["opt"]]["kind"]) == (False, "causal")
    assert (data[served.jobs["bert"]]["loaded"], data[served.jobs["bert"]]["kind"]) == (False, "encoder")
    bob = served.client.get("/v1/served-models", headers=served.headers("bob")).json()["data"]
    assert [m["job_id"] for m in bob] == [served.jobs["bob-llama"]]


def test_loaded_models_are_lru_bounded(tmp_path) -> None:
    seeded = make_app(tmp_path, inference={"max_loaded_models": 2, "max_wait_ms": 0.0})
    add_key(seeded, "alice")
    for kind in ("llama", "opt", "bert"):
        save_model_artifact(kind, tmp_path / kind)
        add_job(seeded, "alice", kind, f"qaas/tiny-{kind}", JobState.succeeded, 100, artifact=tmp_path / kind)
    with TestClient(seeded.app) as client:
        def use(kind: str) -> None:
            path, field = ("/v1/embeddings", "input") if kind == "bert" else ("/v1/completions", "prompt")
            body = {"model": seeded.jobs[kind], field: "hi", **({} if kind == "bert" else {"max_tokens": 1})}
            assert client.post(path, json=body, headers=seeded.headers("alice")).status_code == 200

        registry = lambda: seeded.app.state.inference_registry  # noqa: E731
        use("llama")
        use("opt")
        use("llama")  # llama becomes most recently used
        use("bert")  # evicts opt
        assert registry().loaded_keys() == [seeded.jobs["llama"], seeded.jobs["bert"]]
        assert registry().loads == 3 and registry().evictions == 1
        use("opt")  # loads again, evicts llama
        assert registry().loaded_keys() == [seeded.jobs["bert"], seeded.jobs["opt"]]
        assert registry().loads == 4


def test_tampered_artifact_is_a_clear_500(tmp_path) -> None:
    seeded = make_app(tmp_path)
    add_key(seeded, "alice")
    save_model_artifact("llama", tmp_path / "llama")
    add_job(seeded, "alice", "llama", "qaas/tiny-llama", JobState.succeeded, 100, artifact=tmp_path / "llama")
    weights = tmp_path / "llama" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"tampered")
    with TestClient(seeded.app) as client:
        r = client.post("/v1/completions", headers=seeded.headers("alice"),
                        json={"model": seeded.jobs["llama"], "prompt": "hi", "max_tokens": 1})
    assert r.status_code == 500
    assert "cannot load artifact" in r.json()["error"]["message"] and "sha256" in r.json()["error"]["message"]


def test_evicted_model_closes_only_after_its_last_request(tmp_path) -> None:
    import asyncio

    from service.inference.registry import ModelRegistry, default_artifact_loader
    from service.inference.settings import InferenceSettings
    from service.inference.tokenizers import load_tokenizer

    for kind in ("llama", "opt"):
        save_model_artifact(kind, tmp_path / kind)
    registry = ModelRegistry(InferenceSettings(device="cpu", max_loaded_models=1), default_artifact_loader,
                             load_tokenizer)

    async def scenario() -> None:
        async with registry.lease("llama", tmp_path / "llama") as llama:
            async with registry.lease("opt", tmp_path / "opt"):
                assert registry.loaded_keys() == ["opt"] and llama.evicted
                assert not llama.generation.closed  # still serving the request that holds it
            assert not llama.generation.closed
        assert llama.generation.closed  # last lease gone
        await registry.close()

    asyncio.run(scenario())


def test_app_shutdown_closes_the_engines(tmp_path) -> None:
    seeded = make_app(tmp_path)
    add_key(seeded, "alice")
    save_model_artifact("opt", tmp_path / "opt")
    add_job(seeded, "alice", "opt", "qaas/tiny-opt", JobState.succeeded, 100, artifact=tmp_path / "opt")
    with TestClient(seeded.app) as client:
        r = client.post("/v1/completions", headers=seeded.headers("alice"),
                        json={"model": seeded.jobs["opt"], "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 200
        engine = seeded.app.state.inference_registry.peek(seeded.jobs["opt"]).generation
        assert not engine.closed
    assert engine.closed and not engine.running  # the router's lifespan shut it down
