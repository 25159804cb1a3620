"""Loaded quantized models, cached with an LRU bound, each with its batching engine.

``async with ModelRegistry.lease(key, folder) as handle`` loads an artifact once (in a worker thread,
one load per key at a time), wraps it in a :class:`ServedModelHandle` (model, tokenizer, manifest,
kind, engine) and keeps at most ``max_loaded_models`` of them; the least recently used one is
evicted, and its engine closed once no request holds it any more (it finishes its sequences first).
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Protocol

import torch
from torch import nn

from service.inference.engine import EmbeddingEngine, GenerationEngine
from service.inference.runner import DecoderRunner, EncoderRunner
from service.inference.settings import InferenceSettings

log = logging.getLogger(__name__)

ArtifactLoader = Callable[[Path, str], tuple[nn.Module, Any]]  # (model, ArtifactManifest)


class Tokenizer(Protocol):
    pad_token_id: int | None
    eos_token_id: int | None

    def __call__(self, text: str, **kwargs: Any) -> Any: ...

    def decode(self, ids: list[int], **kwargs: Any) -> str: ...


TokenizerLoader = Callable[[Path, Any], Tokenizer]


class ModelLoadError(RuntimeError):
    """The artifact could not be loaded (missing files, corrupt, unsupported architecture)."""


def default_artifact_loader(folder: Path, device: str) -> tuple[nn.Module, Any]:
    from quant.artifacts import load_artifact

    return load_artifact(folder, device)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


@dataclass
class ServedModelHandle:
    key: str
    model: nn.Module
    tokenizer: Tokenizer
    manifest: Any  # quant.artifacts.ArtifactManifest
    kind: Literal["causal", "encoder"]
    generation: GenerationEngine | None
    embedding: EmbeddingEngine | None
    leases: int = 0  # requests using it now; an evicted handle closes when the last one ends
    evicted: bool = False

    @property
    def max_positions(self) -> int:
        return max_positions(self.model)

    def encode(self, text: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=True)["input_ids"]
        return list(ids)

    def close(self) -> None:
        for engine in (self.generation, self.embedding):
            if engine is not None:
                engine.close(timeout=None)


def model_kind(model: nn.Module) -> Literal["causal", "encoder"]:
    can_generate = getattr(model, "can_generate", None)
    return "causal" if callable(can_generate) and can_generate() else "encoder"


def max_positions(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    return int(getattr(cfg, "max_position_embeddings", None) or 2048)


def eos_ids(model: nn.Module, tokenizer: Tokenizer) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None), tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


def build_handle(
    key: str, model: nn.Module, tokenizer: Tokenizer, manifest: Any, settings: InferenceSettings
) -> ServedModelHandle:
    model.eval()
    kind = model_kind(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pad = 0 if pad is None else int(pad)
    positions = max_positions(model)

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)

    generation = embedding = None
    if kind == "causal":
        generation = GenerationEngine(
            DecoderRunner(model, pad, positions),
            decode,
            eos_ids(model, tokenizer),
            max_batch_size=settings.max_batch_size,
            max_wait_ms=settings.max_wait_ms,
            name=f"generate-{key[:12]}",
        )
    else:
        embedding = EmbeddingEngine(
            EncoderRunner(model, pad, positions),
            max_batch_size=settings.embedding_max_batch_size,
            max_wait_ms=settings.max_wait_ms,
            name=f"embed-{key[:12]}",
        )
    return ServedModelHandle(key, model, tokenizer, manifest, kind, generation, embedding)


class ModelRegistry:
    def __init__(
        self,
        settings: InferenceSettings,
        artifact_loader: ArtifactLoader,
        tokenizer_loader: TokenizerLoader,
    ) -> None:
        self.settings = settings
        self.device = resolve_device(settings.device)
        self._load_artifact = artifact_loader
        self._load_tokenizer = tokenizer_loader
        self._models: OrderedDict[str, ServedModelHandle] = OrderedDict()
        self._loading: dict[str, asyncio.Future[ServedModelHandle]] = {}
        self.loads = 0
        self.evictions = 0

    def loaded_keys(self) -> list[str]:
        return list(self._models)

    def peek(self, key: str) -> ServedModelHandle | None:
        return self._models.get(key)

    @asynccontextmanager
    async def lease(self, key: str, folder: Path) -> AsyncIterator[ServedModelHandle]:
        """The loaded model for ``key`` (loading ``folder`` if needed), held for the request's duration:
        an LRU eviction meanwhile takes it out of the cache but closes it only after the last lease."""
        handle = await self._acquire(key, folder)
        try:
            yield handle
        finally:
            handle.leases -= 1
            if handle.evicted and handle.leases == 0:
                await asyncio.to_thread(handle.close)

    async def _acquire(self, key: str, folder: Path) -> ServedModelHandle:
        handle = self._models.get(key)
        if handle is not None:
            self._models.move_to_end(key)
            handle.leases += 1
            return handle
        pending = self._loading.get(key)
        if pending is not None:
            await asyncio.shield(pending)
            return await self._acquire(key, folder)  # loaded (or evicted again: then reload)
        fut: asyncio.Future[ServedModelHandle] = asyncio.get_running_loop().create_future()
        self._loading[key] = fut
        try:
            handle = await asyncio.to_thread(self._load, key, folder)
        except BaseException as exc:
            fut.set_exception(exc if isinstance(exc, Exception) else ModelLoadError("load cancelled"))
            fut.exception()  # retrieved: waiting callers get it, nobody else warns
            raise
        finally:
            self._loading.pop(key, None)
        self._models[key] = handle
        handle.leases += 1  # before any await: the new handle cannot be closed under this request
        self.loads += 1
        fut.set_result(handle)
        await self._evict()
        return handle

    def _load(self, key: str, folder: Path) -> ServedModelHandle:
        try:
            model, manifest = self._load_artifact(folder, self.device)
            tokenizer = self._load_tokenizer(folder, manifest)
        except Exception as exc:
            raise ModelLoadError(f"cannot load artifact of {key}: {type(exc).__name__}: {exc}") from exc
        return build_handle(key, model, tokenizer, manifest, self.settings)

    async def _evict(self) -> None:
        while len(self._models) > self.settings.max_loaded_models:
            key, handle = self._models.popitem(last=False)
            handle.evicted = True
            self.evictions += 1
            log.info("evicting served model %s (%d requests still using it)", key, handle.leases)
            if handle.leases == 0:
                await asyncio.to_thread(handle.close)

    async def close(self) -> None:
        handles = list(self._models.values())
        self._models.clear()
        for handle in handles:
            handle.evicted = True
        for handle in handles:
            await asyncio.to_thread(handle.close)
