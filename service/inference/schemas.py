"""OpenAI-compatible request/response bodies of the inference endpoints (validated at the boundary).

Invalid fields fail pydantic validation, which FastAPI answers with 422 naming the field's location
(e.g. ``["body", "temperature"]``).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_PROMPTS = 64
MAX_STOP = 4


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Request):
    include_usage: bool = Field(False, description="send a last chunk with usage and no choices before [DONE]")


class CompletionRequest(_Request):
    model: str = Field(..., min_length=1, max_length=256, description="job id or served-model name")
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)]
    max_tokens: int = Field(16, ge=1, le=4096)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP)] | None = None
    n: Literal[1] = Field(1, description="only one completion per prompt is supported")
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    user: str | None = Field(None, max_length=256)
    # OpenAI parameters accepted at their no-op values only (some clients always send them)
    echo: Literal[False] = False
    best_of: Literal[1] = 1
    logprobs: None = None
    presence_penalty: float = Field(0.0, ge=0.0, le=0.0, description="only 0 is supported")
    frequency_penalty: float = Field(0.0, ge=0.0, le=0.0, description="only 0 is supported")

    @field_validator("prompt")
    @classmethod
    def _non_empty_prompt(cls, value: str | list[str]) -> str | list[str]:
        prompts = [value] if isinstance(value, str) else value
        if any(p == "" for p in prompts):
            raise ValueError("prompts must be non-empty strings")
        return value

    @field_validator("stop")
    @classmethod
    def _non_empty_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [] if value is None else [value] if isinstance(value, str) else value
        if any(s == "" for s in stops):
            raise ValueError("stop strings must be non-empty")
        return value

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    @property
    def stops(self) -> tuple[str, ...]:
        return () if self.stop is None else (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class CompletionChunk(BaseModel):
    """One server-sent event of a streamed completion (same object type as OpenAI's chunks)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class EmbeddingRequest(_Request):
    model: str = Field(..., min_length=1, max_length=256)
    input: str | Annotated[list[str], Field(min_length=1, max_length=256)]
    encoding_format: Literal["float", "base64"] = "float"
    user: str | None = Field(None, max_length=256)

    @field_validator("input")
    @classmethod
    def _non_empty(cls, value: str | list[str]) -> str | list[str]:
        items = [value] if isinstance(value, str) else value
        if any(x == "" for x in items):
            raise ValueError("inputs must be non-empty strings")
        return value

    @property
    def inputs(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: Usage


class ServedModel(BaseModel):
    id: str = Field(..., description="served-model name")
    object: Literal["model"] = "model"
    job_id: str
    base_model: str
    kind: Literal["causal", "encoder"] | None = Field(None, description="causal: /v1/completions; encoder: /v1/embeddings")
    loaded: bool
    created: int


class ServedModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ServedModel]
