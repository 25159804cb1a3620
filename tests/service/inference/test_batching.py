"""Through the real HTTP stack (uvicorn on loopback): concurrent requests share forward passes."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from fastapi.testclient import TestClient

from service.db.models import JobState
from tests.service.inference.helpers import (
    LiveServer,
    add_job,
    add_key,
    make_app,
    save_model_artifact,
)

PROMPTS = [f"prompt number {i}" + "!" * i for i in range(12)]
MAX_TOKENS = 5


@pytest.fixture(scope="module")
def batching_app(tmp_path_factory):
    """Engines that gather for up to 250 ms when idle, so requests trickling in through HTTP, auth and
    the database still meet in one batch even on a loaded 2-core machine."""
    tmp = tmp_path_factory.mktemp("batching")
    seeded = make_app(tmp, inference={"max_batch_size": 16, "embedding_max_batch_size": 64, "max_wait_ms": 250.0})
    add_key(seeded, "alice")
    for kind in ("opt", "bert"):
        seeded.models[kind] = save_model_artifact(kind, tmp / kind)
        add_job(seeded, "alice", kind, f"qaas/tiny-{kind}", JobState.succeeded, 100, artifact=tmp / kind)
    with TestClient(seeded.app) as client:
        seeded.client = client
        yield seeded


async def _fire(url: str, headers: dict, path: str, bodies: list[dict]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60) as client:
        return await asyncio.gather(*(client.post(path, json=b) for b in bodies))


def test_concurrent_completions_share_forward_passes(batching_app) -> None:
    job_id = batching_app.jobs["opt"]
    headers = batching_app.headers("alice")
    batching_app.client.post("/v1/completions", headers=headers, json={"model": job_id, "prompt": "warm", "max_tokens": 1})
    engine = batching_app.app.state.inference_registry.peek(job_id).generation
    before = engine.stats()
    bodies = [{"model": job_id, "prompt": p, "max_tokens": MAX_TOKENS, "temperature": 0} for p in PROMPTS]
    with LiveServer(batching_app.app) as server:
        responses = asyncio.run(_fire(server.url, headers, "/v1/completions", bodies))
    assert [r.status_code for r in responses] == [200] * len(PROMPTS)
    assert all(r.json()["usage"]["completion_tokens"] == MAX_TOKENS for r in responses)
    after = engine.stats()
    passes = after.forward_passes - before.forward_passes
    sizes = after.batch_sizes[len(before.batch_sizes):]
    unbatched = len(PROMPTS) * MAX_TOKENS  # one prefill + (MAX_TOKENS - 1) decodes per request
    assert max(sizes) >= len(PROMPTS) // 2, sizes  # many sequences in one forward pass
    assert sum(1 for s in sizes if s > 1) >= MAX_TOKENS - 1, sizes  # decode steps shared too
    assert passes <= unbatched // 3, (passes, sizes)
    # the same prompts one at a time give the same text (greedy): batching changes nothing but speed
    for body, response in zip(bodies[:3], responses[:3]):
        solo = batching_app.client.post("/v1/completions", headers=headers, json=body).json()
        assert solo["choices"][0]["text"] == response.json()["choices"][0]["text"]


def test_concurrent_embeddings_share_forward_passes(batching_app) -> None:
    job_id = batching_app.jobs["bert"]
    headers = batching_app.headers("alice")
    batching_app.client.post("/v1/embeddings", headers=headers, json={"model": job_id, "input": "warm"})
    engine = batching_app.app.state.inference_registry.peek(job_id).embedding
    before = engine.stats().forward_passes
    bodies = [{"model": job_id, "input": p} for p in PROMPTS]
    with LiveServer(batching_app.app) as server:
        responses = asyncio.run(_fire(server.url, headers, "/v1/embeddings", bodies))
    assert [r.status_code for r in responses] == [200] * len(PROMPTS)
    passes = engine.stats().forward_passes - before
    assert passes <= len(PROMPTS) // 4, engine.stats().batch_sizes[-passes:]
