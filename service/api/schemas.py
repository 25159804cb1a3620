"""Request and response bodies of the /v1 API (pydantic, with OpenAPI examples)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from service.db.models import JobState

RECIPE_EXAMPLE: dict[str, Any] = {
    "name": "my-w4a8",
    "method": {"name": "gptq"},
    "weight": {"bits": 4, "granularity": "per_channel", "algorithm": "gptq"},
    "activation": {"bits": 8},
    "calibration": {"num_samples": 32, "seq_len": 256},
}


class ModelRegister(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"model_id": "qaas/llama-small"}]})

    model_id: str = Field(..., min_length=1, max_length=256, description="model ID resolved offline via the store")


class ModelOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    model_id: str
    resolved_path: str
    kind: str
    created_at: datetime


class ModelList(BaseModel):
    items: list[ModelOut]
    available: list[str] = Field(description="model IDs loadable offline that can be registered")


class RecipeOut(BaseModel):
    name: str
    source: Literal["preset", "user"]
    recipe: dict[str, Any]


class RecipeList(BaseModel):
    items: list[RecipeOut]


class RecipeCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"name": "my-w4a8", "recipe": RECIPE_EXAMPLE}]}
    )

    name: str = Field(..., min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    recipe: dict[str, Any]


class RecipeValidateIn(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"recipe": RECIPE_EXAMPLE}]})

    recipe: dict[str, Any]


class RecipeValidateOut(BaseModel):
    valid: Literal[True] = True
    recipe: dict[str, Any] = Field(description="the recipe with every default filled in")
    bits_label: str


class JobCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"model_id": "qaas/llama-small", "preset": "quarot-w4a8"},
                {"model_id": "sentence-transformers/all-MiniLM-L6-v2", "recipe": RECIPE_EXAMPLE, "device": "cpu"},
            ]
        },
    )

    model_id: str = Field(..., min_length=1, max_length=256)
    recipe: dict[str, Any] | None = Field(None, description="a full recipe object")
    preset: str | None = Field(None, description="a preset name or one of your saved recipe names")
    device: Literal["cpu", "cuda"] | None = Field(None, description="routes to the cpu or gpu worker queue")

    @model_validator(mode="after")
    def _one_recipe(self) -> "JobCreate":
        if (self.recipe is None) == (self.preset is None):
            raise ValueError("give exactly one of recipe or preset")
        return self


class ArtifactOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    sha256: str
    size_bytes: int
    manifest: dict[str, Any]
    download_url: str


class JobOut(BaseModel):
    id: str
    model_id: str
    recipe_name: str | None
    recipe: dict[str, Any]
    device: str
    state: JobState
    progress: int = Field(ge=0, le=100)
    message: str | None
    error: str | None
    attempts: int
    max_attempts: int
    idempotency_key: str | None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    deadline_at: datetime
    artifact: ArtifactOut | None


class JobPage(BaseModel):
    items: list[JobOut]
    next_cursor: str | None = Field(None, description="pass as ?cursor= to get the next page")


class MetricsOut(BaseModel):
    job_id: str
    metrics: dict[str, float | str | None]


class ApiKeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"owner": "alice"}]})

    owner: str = Field(..., min_length=1, max_length=128)


class ApiKeyCreated(BaseModel):
    key_id: str
    owner: str
    api_key: str = Field(description="shown once; only a salted hash is stored")


class ReapOut(BaseModel):
    expired: list[str]
    requeued: list[str]
    exhausted: list[str]
