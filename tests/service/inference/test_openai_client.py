"""The official OpenAI Python client talks to the inference endpoints unchanged (base_url + API key)."""

from __future__ import annotations

import math

import openai
import pytest

from tests.service.inference.helpers import LiveServer


def test_openai_client_completions_stream_and_embeddings(served) -> None:
    with LiveServer(served.app) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=served.keys["alice"], max_retries=0)
        done = client.completions.create(model="qaas/tiny-llama:w4a8", prompt="hello", max_tokens=5, temperature=0)
        assert done.object == "text_completion" and done.usage.completion_tokens == 5
        text = done.choices[0].text

        chunks = list(client.completions.create(model="qaas/tiny-llama:w4a8", prompt="hello", max_tokens=5,
                                                temperature=0, stream=True))
        assert "".join(c.choices[0].text for c in chunks) == text
        assert chunks[-1].choices[0].finish_reason == "length"

        emb = client.embeddings.create(model="qaas/tiny-bert:rtn", input=["one", "two words"])
        assert [d.index for d in emb.data] == [0, 1]
        assert all(abs(math.sqrt(sum(x * x for x in d.embedding)) - 1.0) < 1e-4 for d in emb.data)

        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="qaas/tiny-llama:missing", prompt="x", max_tokens=1)
        with pytest.raises(openai.UnprocessableEntityError):
            client.completions.create(model="qaas/tiny-llama:w4a8", prompt="x", max_tokens=1, temperature=9)
