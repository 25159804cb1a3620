"""Fixtures of the inference tests: a character-level tokenizer matching the tiny models' 128-token
vocabulary, and tiny random models quantized with RTN (W4 g32, A8) so every forward goes through
QuantLinear. Mechanics only: the models are random, outputs mean nothing."""

from __future__ import annotations

import pytest

from tests.service.inference.helpers import make_char_tokenizer, quantized_bert, quantized_llama, quantized_opt


@pytest.fixture(scope="module")
def char_tokenizer():
    return make_char_tokenizer()


@pytest.fixture(scope="module")
def qllama():
    return quantized_llama()


@pytest.fixture(scope="module")
def qopt():
    return quantized_opt()


@pytest.fixture(scope="module")
def qbert():
    return quantized_bert()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A test app with two keys and succeeded jobs whose artifacts are tiny quantized models:
    alice: llama (served as ``qaas/tiny-llama:w4a8``), opt, bert, one running job; bob: llama."""
    from fastapi.testclient import TestClient

    from service.db.models import JobState
    from tests.service.inference.helpers import add_job, add_key, make_app, save_model_artifact

    tmp = tmp_path_factory.mktemp("served")
    seeded = make_app(tmp, inference={"max_batch_size": 8, "max_wait_ms": 30.0, "max_loaded_models": 4})
    add_key(seeded, "alice")
    add_key(seeded, "bob")
    models = {}
    for kind in ("llama", "opt", "bert"):
        models[kind] = save_model_artifact(kind, tmp / "artifacts" / kind)
    add_job(seeded, "alice", "llama", "qaas/tiny-llama", JobState.succeeded, 100, recipe_name="w4a8",
            artifact=tmp / "artifacts" / "llama")
    add_job(seeded, "alice", "opt", "qaas/tiny-opt", JobState.succeeded, 100, artifact=tmp / "artifacts" / "opt")
    add_job(seeded, "alice", "bert", "qaas/tiny-bert", JobState.succeeded, 100, artifact=tmp / "artifacts" / "bert")
    add_job(seeded, "alice", "running", "qaas/tiny-llama", JobState.running, 30)
    add_job(seeded, "bob", "bob-llama", "qaas/tiny-llama", JobState.succeeded, 100, artifact=tmp / "artifacts" / "llama")
    with TestClient(seeded.app) as client:
        seeded.client = client
        seeded.models = models
        yield seeded


@pytest.fixture(scope="module")
def qllama_kv4():
    """RTN W4A8 plus 4-bit KV-cache quantization (the qaas attention function)."""
    from tests.service.inference.helpers import RTN_RECIPE, quantized_llama_with

    return quantized_llama_with({**RTN_RECIPE, "kv_cache": {"bits": 4}})
