"""OpenAI-compatible inference endpoints over finished jobs' quantized artifacts.

``POST /v1/completions`` (non-streamed, or server-sent events ending with ``data: [DONE]``),
``POST /v1/embeddings`` (encoders: mean-pooled, L2-normalised), ``GET /v1/served-models``.
Every request is scoped to the caller's API key: only that key's succeeded jobs can be served.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial
from typing import Any

import torch
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import StreamingResponse

from service.api.deps import ApiKeyDep
from service.errors import ApiError
from service.inference.engine import Failed, Finished, TextDelta
from service.inference.jobs import JobNotReady, UnknownModel, resolve_job, servable_jobs
from service.inference.registry import (
    ModelLoadError,
    ModelRegistry,
    ServedModelHandle,
    default_artifact_loader,
)
from service.inference.sampling import SamplingParams
from service.inference.schemas import (
    CompletionChoice,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    EmbeddingData,
    EmbeddingRequest,
    EmbeddingResponse,
    ServedModel,
    ServedModelList,
    Usage,
)
from service.inference.settings import InferenceSettings
from service.inference.tokenizers import load_tokenizer


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    yield
    registry: ModelRegistry | None = getattr(app.state, "inference_registry", None)
    if registry is not None:
        await registry.close()


router = APIRouter(prefix="/v1", tags=["inference"], lifespan=_lifespan)


def get_registry(request: Request) -> ModelRegistry:
    """The app's model registry, built on first use from ``app.state`` (settings, optional loader)."""
    state = request.app.state
    registry: ModelRegistry | None = getattr(state, "inference_registry", None)
    if registry is None:
        settings: InferenceSettings = getattr(state, "inference_settings", None) or InferenceSettings()
        loader = getattr(state, "artifact_loader", None) or default_artifact_loader
        model_store = getattr(getattr(state, "settings", None), "model_store", None)
        registry = ModelRegistry(settings, loader, partial(load_tokenizer, model_store=model_store))
        state.inference_registry = registry
    return registry


@asynccontextmanager
async def _serve(request: Request, api_key_id: int, name: str) -> AsyncIterator[ServedModelHandle]:
    """The loaded model ``name`` names for this key, leased for the request (404 / 409 / 500)."""
    factory = request.app.state.session_factory
    try:
        job = await asyncio.to_thread(resolve_job, factory, api_key_id, name)
    except UnknownModel as exc:
        raise ApiError(404, str(exc)) from exc
    except JobNotReady as exc:
        raise ApiError(409, str(exc)) from exc
    async with AsyncExitStack() as stack:
        try:
            handle = await stack.enter_async_context(get_registry(request).lease(job.job_id, job.artifact_path))
        except ModelLoadError as exc:
            raise ApiError(500, str(exc)) from exc
        yield handle


def _encode_all(handle: ServedModelHandle, texts: list[str], field: str) -> list[list[int]]:
    limit = handle.max_positions
    out = []
    for i, text in enumerate(texts):
        ids = handle.encode(text)
        if not ids:
            raise ApiError(400, f"{field}[{i}] encodes to no tokens")
        if len(ids) >= limit:
            raise ApiError(400, f"{field}[{i}] has {len(ids)} tokens; this model's context is {limit}")
        out.append(ids)
    return out


# ---------------------------------------------------------------------------- completions
@router.post("/completions", response_model=CompletionResponse)
async def create_completion(body: CompletionRequest, key: ApiKeyDep, request: Request) -> Any:
    stack = AsyncExitStack()
    handle = await stack.enter_async_context(_serve(request, key.id, body.model))
    handed_to_stream = False
    try:
        if handle.generation is None:
            raise ApiError(400, f"model {body.model!r} is an encoder; use /v1/embeddings")
        prompts = _encode_all(handle, body.prompts, "prompt")
        params = SamplingParams(
            max_tokens=body.max_tokens, temperature=body.temperature, top_p=body.top_p, stop=body.stops,
            seed=body.seed,
        )
        completion_id = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            events = _stream_events(handle, prompts, params, completion_id, created, body.model, include_usage, stack)
            handed_to_stream = True  # the stream releases the model lease when it ends
            return StreamingResponse(
                events,
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        finals = await asyncio.gather(*(_run_to_end(handle, p, params) for p in prompts))
    finally:
        if not handed_to_stream:
            await stack.aclose()
    choices = [CompletionChoice(index=i, text=f.text, finish_reason=f.reason) for i, f in enumerate(finals)]
    prompt_tokens = sum(f.prompt_tokens for f in finals)
    completion_tokens = sum(f.completion_tokens for f in finals)
    return CompletionResponse(
        id=completion_id,
        created=created,
        model=body.model,
        choices=choices,
        usage=Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        ),
    )


async def _run_to_end(handle: ServedModelHandle, prompt: list[int], params: SamplingParams) -> Finished:
    assert handle.generation is not None
    async for event in handle.generation.generate(prompt, params):
        if isinstance(event, Finished):
            return event
        if isinstance(event, Failed):
            raise ApiError(500, f"generation failed: {event.error}")
    raise ApiError(500, "generation ended without a result")


def _sse(payload: CompletionChunk | dict[str, Any]) -> str:
    data = payload if isinstance(payload, dict) else payload.model_dump(mode="json")
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


async def _stream_events(
    handle: ServedModelHandle,
    prompts: list[list[int]],
    params: SamplingParams,
    completion_id: str,
    created: int,
    model: str,
    include_usage: bool,
    lease: AsyncExitStack,
) -> AsyncIterator[str]:
    """OpenAI chunk stream: one chunk per text delta (per prompt index), a final chunk per prompt with
    its finish_reason, a usage chunk (only with ``stream_options.include_usage``), then ``data: [DONE]``."""
    assert handle.generation is not None
    merged: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

    async def pump(index: int, prompt: list[int]) -> None:
        async for event in handle.generation.generate(prompt, params):
            await merged.put((index, event))

    tasks = [asyncio.create_task(pump(i, p)) for i, p in enumerate(prompts)]
    remaining = len(prompts)
    prompt_tokens = completion_tokens = 0

    def chunk(index: int, text: str, reason: str | None) -> str:
        choice = CompletionChoice(index=index, text=text, finish_reason=reason)
        return _sse(CompletionChunk(id=completion_id, created=created, model=model, choices=[choice]))

    try:
        while remaining:
            index, event = await merged.get()
            if isinstance(event, TextDelta):
                yield chunk(index, event.text, None)
            elif isinstance(event, Finished):
                remaining -= 1
                prompt_tokens += event.prompt_tokens
                completion_tokens += event.completion_tokens
                yield chunk(index, "", event.reason)
            elif isinstance(event, Failed):
                yield _sse({"error": {"message": f"generation failed: {event.error}", "type": "server_error"}})
                break
        else:
            if include_usage:
                usage = Usage(
                    prompt_tokens=prompt_tokens,
                    completion_tokens=completion_tokens,
                    total_tokens=prompt_tokens + completion_tokens,
                )
                yield _sse(CompletionChunk(id=completion_id, created=created, model=model, choices=[], usage=usage))
        yield "data: [DONE]\n\n"
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await lease.aclose()


# ---------------------------------------------------------------------------- embeddings
@router.post("/embeddings", response_model=EmbeddingResponse)
async def create_embeddings(body: EmbeddingRequest, key: ApiKeyDep, request: Request) -> Any:
    async with _serve(request, key.id, body.model) as handle:
        if handle.embedding is None:
            raise ApiError(400, f"model {body.model!r} is a causal LM; embeddings are served for encoder models")
        inputs = _encode_all(handle, body.inputs, "input")
        try:
            vectors = await handle.embedding.embed(inputs)
        except RuntimeError as exc:
            raise ApiError(500, f"embedding failed: {exc}") from exc
    data = [EmbeddingData(index=i, embedding=_format(v, body.encoding_format)) for i, v in enumerate(vectors)]
    tokens = sum(len(x) for x in inputs)
    return EmbeddingResponse(
        data=data, model=body.model, usage=Usage(prompt_tokens=tokens, completion_tokens=0, total_tokens=tokens)
    )


def _format(vector: torch.Tensor, encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(vector.to(torch.float32).numpy().astype("<f4").tobytes()).decode("ascii")
    return [float(x) for x in vector.tolist()]


# ---------------------------------------------------------------------------- listing
@router.get("/served-models", response_model=ServedModelList)
async def list_served_models(key: ApiKeyDep, request: Request) -> Any:
    jobs = await asyncio.to_thread(servable_jobs, request.app.state.session_factory, key.id)
    registry = get_registry(request)
    data = []
    for job in jobs:
        handle = registry.peek(job.job_id)
        data.append(
            ServedModel(
                id=job.served_name,
                job_id=job.job_id,
                base_model=job.base_model,
                kind=job.kind if handle is None else handle.kind,
                loaded=handle is not None,
                created=int(job.created.timestamp()),
            )
        )
    return ServedModelList(data=data)
