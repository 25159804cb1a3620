"""Library settings read from the environment (prefix ``QAAS_``), e.g. ``QAAS_MODEL_STORE``."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class QuantSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="QAAS_", extra="ignore")

    model_store: Path = Field(
        default=Path.home() / ".cache" / "qaas" / "models",
        description="folder of HF-format model folders, named <id> or <org>--<name>",
    )
    allow_hub: bool = Field(
        default=False,
        description="fall back to downloading from the Hugging Face hub when a model is not found offline",
    )
    artifact_root: Path = Field(
        default=Path.home() / ".cache" / "qaas" / "artifacts",
        description="default parent folder of saved quantized artifacts",
    )


def get_settings() -> QuantSettings:
    """Fresh settings each call, so environment changes (tests, workers) take effect."""
    return QuantSettings()
