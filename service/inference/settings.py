"""Inference settings (environment variables prefixed ``QAAS_INFERENCE_``).

Kept apart from :class:`service.settings.Settings` so the inference package owns its knobs; the
app may hang an instance on ``app.state.inference_settings``, otherwise one is read from the
environment when the first inference request arrives.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class InferenceSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="QAAS_INFERENCE_", extra="ignore")

    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when available, else CPU")
    max_loaded_models: int = Field(2, ge=1, le=64, description="LRU bound of models kept loaded")
    max_batch_size: int = Field(16, ge=1, le=512, description="sequences per batched forward pass (1 = unbatched)")
    embedding_max_batch_size: int = Field(64, ge=1, le=4096, description="inputs per batched embedding pass")
    max_wait_ms: float = Field(10.0, ge=0.0, le=1000.0, description="how long an idle engine gathers a batch")
