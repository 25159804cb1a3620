"""Inference over finished jobs' quantized artifacts: OpenAI-compatible completions and embeddings,
served through asyncio batching engines (continuous batching with a KV cache). Include ``router``."""

from service.inference.routes import router

__all__ = ["router"]
