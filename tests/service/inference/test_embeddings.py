"""POST /v1/embeddings on an encoder artifact: mean-pooled, L2-normalised, float or base64."""

from __future__ import annotations

import base64

import numpy as np
import torch

from tests.service.inference.helpers import make_char_tokenizer

TOK = make_char_tokenizer()


@torch.no_grad()
def reference_embedding(model: torch.nn.Module, text: str) -> torch.Tensor:
    hidden = model(input_ids=torch.tensor([TOK(text)["input_ids"]])).last_hidden_state[0]
    return torch.nn.functional.normalize(hidden.mean(0), dim=0)


def test_embeddings_float_and_base64(served) -> None:
    texts = ["first sentence", "second, longer sentence here", "x"]
    r = served.client.post("/v1/embeddings", headers=served.headers("alice"),
                           json={"model": served.jobs["bert"], "input": texts})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "list" and [d["index"] for d in out["data"]] == [0, 1, 2]
    assert out["usage"]["prompt_tokens"] == sum(len(t) for t in texts) == out["usage"]["total_tokens"]
    vectors = torch.tensor([d["embedding"] for d in out["data"]])
    assert vectors.shape == (3, 64)
    assert torch.allclose(vectors.norm(dim=-1), torch.ones(3), atol=1e-5)
    for v, t in zip(vectors, texts):  # padding in the batch does not change any embedding
        assert torch.allclose(v, reference_embedding(served.models["bert"], t), atol=1e-4)

    r = served.client.post("/v1/embeddings", headers=served.headers("alice"),
                           json={"model": "qaas/tiny-bert:rtn", "input": texts[0], "encoding_format": "base64"})
    [item] = r.json()["data"]
    decoded = np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4")
    assert np.allclose(decoded, vectors[0].numpy(), atol=1e-6)
