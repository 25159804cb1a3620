"""The batching engines: concurrent requests share forward passes, results equal unbatched ones,
new requests join a running batch between decode steps (continuous batching)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from service.inference.engine import EmbeddingEngine, Failed, Finished, GenerationEngine, TextDelta
from service.inference.runner import DecoderRunner, EncoderRunner
from service.inference.sampling import SamplingParams

PROMPTS = ["hello", "a longer prompt here", "xyz", "quantize me", "0123456789", "k", "batch", "engine!"]


def _engine(model, tokenizer, max_batch_size: int, max_wait_ms: float = 50.0) -> GenerationEngine:
    return GenerationEngine(
        DecoderRunner(model, pad_token_id=0, max_positions=256),
        lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
        eos_token_ids=set(),
        max_batch_size=max_batch_size,
        max_wait_ms=max_wait_ms,
    )


async def _collect(engine: GenerationEngine, ids: list[int], params: SamplingParams) -> tuple[str, Finished]:
    text = ""
    async for event in engine.generate(ids, params):
        if isinstance(event, TextDelta):
            text += event.text
        elif isinstance(event, Finished):
            return text, event
        else:
            raise AssertionError(event)
    raise AssertionError("no Finished event")


def test_concurrent_requests_share_forward_passes(qllama, char_tokenizer) -> None:
    params = SamplingParams(max_tokens=6, temperature=0.0)
    ids = [char_tokenizer(p)["input_ids"] for p in PROMPTS]

    async def run(engine: GenerationEngine) -> list[tuple[str, Finished]]:
        return await asyncio.gather(*(_collect(engine, x, params) for x in ids))

    batched, unbatched = _engine(qllama, char_tokenizer, 8), _engine(qllama, char_tokenizer, 1, 0.0)
    try:
        got = asyncio.run(run(batched))
        want = asyncio.run(run(unbatched))
    finally:
        batched.close()
        unbatched.close()
    assert [g[0] for g in got] == [w[0] for w in want]  # same greedy text, batched or not
    assert all(f.reason == "length" and f.completion_tokens == 6 for _, f in got)
    assert [f.prompt_tokens for _, f in got] == [len(x) for x in ids]
    b, u = batched.stats(), unbatched.stats()
    assert u.forward_passes == len(PROMPTS) * 6  # one prefill + five decodes each, one at a time
    assert u.max_batch_size_seen == 1
    assert b.forward_passes <= 6 + 2  # 8 requests gathered into (almost always) one batch
    assert b.max_batch_size_seen == len(PROMPTS)
    assert b.requests == u.requests == len(PROMPTS)


def test_new_request_joins_running_batch(qllama, char_tokenizer) -> None:
    long_ids = char_tokenizer("the first request")["input_ids"]
    short_ids = char_tokenizer("joins")["input_ids"]
    greedy = SamplingParams(max_tokens=20, temperature=0.0)

    async def scenario(engine: GenerationEngine) -> tuple[str, str]:
        first_tokens = asyncio.Event()
        text = ""

        async def first() -> str:
            nonlocal text
            async for event in engine.generate(long_ids, greedy):
                if isinstance(event, TextDelta):
                    text += event.text
                    if len(text) >= 3:
                        first_tokens.set()
                elif isinstance(event, Finished):
                    return text
            raise AssertionError("first request failed")

        task = asyncio.create_task(first())
        await first_tokens.wait()  # the first request is decoding; now the second arrives
        second, _ = await _collect(engine, short_ids, SamplingParams(max_tokens=4, temperature=0.0))
        return await task, second

    engine = _engine(qllama, char_tokenizer, 4, 0.0)
    solo = _engine(qllama, char_tokenizer, 1, 0.0)
    try:
        got_first, got_second = asyncio.run(scenario(engine))
        want_first, _ = asyncio.run(_collect(solo, long_ids, greedy))
        want_second, _ = asyncio.run(_collect(solo, short_ids, SamplingParams(max_tokens=4, temperature=0.0)))
    finally:
        engine.close()
        solo.close()
    assert (got_first, got_second) == (want_first, want_second)
    stats = engine.stats()
    assert stats.prefill_passes == 2  # the second prompt was prefilled on its own ...
    assert 2 in stats.batch_sizes  # ... and then decoded together with the running first one
    assert stats.forward_passes < 20 + 4  # fewer passes than running them one after the other


def test_stop_string_and_failure_events(qllama, char_tokenizer) -> None:
    ids = char_tokenizer("hello")["input_ids"]

    async def run() -> tuple[str, Finished, str, Finished]:
        engine = _engine(qllama, char_tokenizer, 4, 0.0)
        try:
            full, _ = await _collect(engine, ids, SamplingParams(max_tokens=12, temperature=0.0))
            stop = full[3:5]
            cut, fin = await _collect(engine, ids, SamplingParams(max_tokens=12, temperature=0.0, stop=(stop,)))
            return full, fin, cut, stop
        finally:
            engine.close()

    full, fin, cut, stop = asyncio.run(run())
    assert len(full) == 12
    assert cut == full[: full.index(stop)]
    assert fin.reason == "stop" and stop not in cut


def test_failed_forward_reports_and_engine_survives(char_tokenizer) -> None:
    class Broken(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, **kwargs):
            raise RuntimeError("boom")

    engine = _engine(Broken(), char_tokenizer, 2, 0.0)

    async def run() -> list:
        return [e async for e in engine.generate([5, 6], SamplingParams(max_tokens=2))]

    try:
        events = asyncio.run(run())
        again = asyncio.run(run())
    finally:
        engine.close()
    assert len(events) == 1 and isinstance(events[0], Failed) and "boom" in events[0].error
    assert isinstance(again[0], Failed)  # the worker thread is still alive


def test_embedding_engine_batches_concurrent_requests(qbert, char_tokenizer) -> None:
    texts = ["alpha", "beta gamma", "delta", "epsilon zeta eta", "theta"]
    ids = [char_tokenizer(t)["input_ids"] for t in texts]
    engine = EmbeddingEngine(EncoderRunner(qbert, 0, 512), max_batch_size=16, max_wait_ms=50.0)

    async def run() -> list[torch.Tensor]:
        return await asyncio.gather(*(engine.embed([x]) for x in ids))

    try:
        vectors = asyncio.run(run())
        solo = [asyncio.run(engine.embed([x])) for x in ids[:2]]
    finally:
        engine.close()
    stats = engine.stats()
    assert stats.batch_sizes[0] == len(texts)  # five requests, one forward pass
    assert stats.forward_passes == 1 + 2
    for v, s in zip(vectors[:2], solo):
        assert torch.allclose(v, s, atol=1e-5)
    assert all(abs(float(v.norm()) - 1.0) < 1e-5 for v in vectors)


@pytest.mark.parametrize("seed", [3])
def test_seeded_sampling_is_reproducible(qopt, char_tokenizer, seed: int) -> None:
    ids = char_tokenizer("sample")["input_ids"]
    params = SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, seed=seed)
    engine = _engine(qopt, char_tokenizer, 4, 0.0)
    try:
        a = asyncio.run(_collect(engine, ids, params))[0]
        b = asyncio.run(_collect(engine, ids, params))[0]
    finally:
        engine.close()
    assert a == b and len(a) == 8


def test_abandoned_request_leaves_the_batch(qllama, char_tokenizer) -> None:
    """A client that stops reading (closed stream) is dropped at the next step; others go on."""
    ids = char_tokenizer("abandon")["input_ids"]
    long = SamplingParams(max_tokens=40, temperature=0.0)

    async def run(engine: GenerationEngine) -> tuple[str, str]:
        stream = engine.generate(ids, long)
        keeper = asyncio.create_task(_collect(engine, ids, SamplingParams(max_tokens=12, temperature=0.0)))
        got = ""
        async for event in stream:
            got += event.text
            if len(got) >= 2:
                break
        await stream.aclose()  # what Starlette does when the client disconnects
        text, _ = await keeper
        return got, text

    engine = _engine(qllama, char_tokenizer, 4, 20.0)
    try:
        got, kept = asyncio.run(run(engine))
    finally:
        engine.close()
    assert len(got) >= 2 and len(kept) == 12
    stats = engine.stats()
    assert stats.decode_passes < 40  # the abandoned 40-token request did not run to its end
    assert stats.batch_sizes[-1] == 1  # it left; the other one finished alone
