"""POST /v1/completions through the real app on artifacts of tiny quantized models: non-streamed and
server-sent-event streams in OpenAI's chunk format."""

from __future__ import annotations

import json

import torch

from tests.service.inference.helpers import make_char_tokenizer

TOK = make_char_tokenizer()


@torch.no_grad()
def greedy_reference(model: torch.nn.Module, prompt: str, n: int) -> str:
    """Plain full-sequence greedy decoding (no cache, no batching)."""
    ids = TOK(prompt)["input_ids"]
    out: list[int] = []
    for _ in range(n):
        logits = model(input_ids=torch.tensor([ids + out])).logits[0, -1]
        out.append(int(logits.argmax()))
    return TOK.decode(out, skip_special_tokens=True)


def parse_sse(text: str) -> list[dict | str]:
    events = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: "), block
        payload = block[len("data: "):]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def test_completion_matches_greedy_reference(served) -> None:
    job_id = served.jobs["llama"]
    body = {"model": job_id, "prompt": "hello world", "max_tokens": 8, "temperature": 0}
    r = served.client.post("/v1/completions", json=body, headers=served.headers("alice"))
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "text_completion" and out["model"] == job_id and out["id"].startswith("cmpl-")
    [choice] = out["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] == "length"
    assert choice["text"] == greedy_reference(served.models["llama"], "hello world", 8)
    assert out["usage"] == {"prompt_tokens": 11, "completion_tokens": 8, "total_tokens": 19}


def test_served_name_list_prompt_and_stop(served) -> None:
    headers = served.headers("alice")
    prompts = ["abc", "a much longer second prompt"]
    r = served.client.post("/v1/completions", headers=headers,
                           json={"model": "qaas/tiny-opt:rtn", "prompt": prompts, "max_tokens": 6, "temperature": 0.0})
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    for c, p in zip(choices, prompts):
        assert c["text"] == greedy_reference(served.models["opt"], p, 6)
    full = choices[1]["text"]
    stop = full[2:4]
    r = served.client.post("/v1/completions", headers=headers, json={
        "model": "qaas/tiny-opt:rtn", "prompt": prompts[1], "max_tokens": 6, "temperature": 0.0, "stop": [stop]})
    [c] = r.json()["choices"]
    assert c["text"] == full[: full.index(stop)] and c["finish_reason"] == "stop"


def test_sampling_with_seed_is_reproducible(served) -> None:
    body = {"model": "qaas/tiny-llama:w4a8", "prompt": "sample", "max_tokens": 10, "temperature": 1.2,
            "top_p": 0.95, "seed": 7}
    a = served.client.post("/v1/completions", json=body, headers=served.headers("alice")).json()
    b = served.client.post("/v1/completions", json=body, headers=served.headers("alice")).json()
    assert a["choices"][0]["text"] == b["choices"][0]["text"]
    assert a["usage"]["completion_tokens"] == 10


def test_stream_yields_openai_chunks_then_done(served) -> None:
    job_id = served.jobs["llama"]
    body = {"model": job_id, "prompt": ["hello world", "xy"], "max_tokens": 7, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with served.client.stream("POST", "/v1/completions", json=body, headers=served.headers("alice")) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = parse_sse(r.read().decode())
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "text_completion" and c["model"] == job_id for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    texts = {0: "", 1: ""}
    finish = {}
    for c in chunks[:-1]:
        [choice] = c["choices"]
        texts[choice["index"]] += choice["text"]
        if choice["finish_reason"] is not None:
            finish[choice["index"]] = choice["finish_reason"]
    assert finish == {0: "length", 1: "length"}
    assert texts[0] == greedy_reference(served.models["llama"], "hello world", 7)
    assert texts[1] == greedy_reference(served.models["llama"], "xy", 7)
    assert sum(1 for c in chunks[:-1] if c["choices"][0]["text"]) > 2  # really incremental
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 14


def test_stream_without_usage_and_openai_noop_defaults(served) -> None:
    """Without stream_options every chunk has a choice (as OpenAI's); clients that always send the
    no-op defaults of unsupported parameters are accepted."""
    body = {"model": served.jobs["llama"], "prompt": "abc", "max_tokens": 3, "temperature": 0, "stream": True,
            "echo": False, "best_of": 1, "logprobs": None, "presence_penalty": 0, "frequency_penalty": 0.0}
    with served.client.stream("POST", "/v1/completions", json=body, headers=served.headers("alice")) as r:
        assert r.status_code == 200
        events = parse_sse(r.read().decode())
    assert events[-1] == "[DONE]"
    assert all(len(c["choices"]) == 1 and c.get("usage") is None for c in events[:-1])
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert "".join(c["choices"][0]["text"] for c in events[:-1]) == greedy_reference(served.models["llama"], "abc", 3)
