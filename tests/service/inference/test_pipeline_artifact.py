"""The whole path a user takes: quant.pipeline.run_quantization writes the artifact of a job, and the
inference API serves exactly that artifact (greedy output equals the reloaded artifact's own)."""

from __future__ import annotations

import torch
from fastapi.testclient import TestClient

from quant.artifacts import load_artifact
from quant.pipeline import JobSpec, run_quantization
from quant.recipes.schema import Recipe
from service.db.models import JobState
from tests.conftest import make_tiny_llama
from tests.service.inference.helpers import RTN_RECIPE, add_job, add_key, make_app, make_char_tokenizer


def test_pipeline_artifact_is_served(tmp_path) -> None:
    tokenizer = make_char_tokenizer()
    base = tmp_path / "store" / "tiny-llama"
    model = make_tiny_llama(outliers=False)
    model.generation_config.eos_token_id = None
    model.save_pretrained(base)
    tokenizer.save_pretrained(str(base))
    recipe = Recipe.model_validate({**RTN_RECIPE, "calibration": {"num_samples": 4, "seq_len": 32},
                                    "evaluation": {"num_samples": 2, "seq_len": 32}})
    result = run_quantization(JobSpec(model_id=str(base), recipe=recipe, artifact_dir=tmp_path / "artifact"))
    assert result.model_kind == "causal_lm" and "kl_mean" in result.metrics

    seeded = make_app(tmp_path / "app")
    add_key(seeded, "alice")
    job_id = add_job(seeded, "alice", "job", str(base), JobState.succeeded, 100, recipe=recipe.model_dump(mode="json"),
                     artifact=result.artifact_path, metrics=result.metrics)
    with TestClient(seeded.app) as client:
        r = client.post("/v1/completions", headers=seeded.headers("alice"),
                        json={"model": job_id, "prompt": "the quick brown fox", "max_tokens": 6, "temperature": 0})
    assert r.status_code == 200, r.text

    served, _ = load_artifact(result.artifact_path)
    ids = tokenizer("the quick brown fox")["input_ids"]
    with torch.no_grad():
        for _ in range(6):
            ids.append(int(served(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    expected = tokenizer.decode(ids[-6:], skip_special_tokens=True)
    assert r.json()["choices"][0]["text"] == expected
