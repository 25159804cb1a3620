"""The artifact manifest: everything needed to rebuild a quantized model without re-calibrating."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from quant.methods.base import LayerReport
from quant.recipes.schema import Recipe

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"


class ArtifactManifest(BaseModel):
    format_version: int = FORMAT_VERSION
    base_model_id: str
    recipe: Recipe
    method: str = ""  # defaults to recipe.method.name
    model_kind: str = ""  # "causal_lm" | "encoder"; filled in on save
    architecture: str = ""  # transformers class name, filled in on save
    base_config: dict[str, Any] = Field(default_factory=dict)  # filled in on save
    dtype: str = ""  # filled in on save
    modules: dict[str, dict[str, Any]] = Field(default_factory=dict)  # qaas module layout, filled in on save
    tied_parameters: list[list[str]] = Field(default_factory=list)  # parameter names sharing one tensor
    metrics: dict[str, float] = Field(default_factory=dict)
    layers: list[LayerReport] = Field(default_factory=list)  # per-layer report of the method
    report_summary: dict[str, float] = Field(default_factory=dict)
    weights_file: str = WEIGHTS_FILE
    weights_sha256: str = ""  # filled in on save
    size_bytes: int = 0  # of the weights file, filled in on save
    tokenizer_files: list[str] = Field(default_factory=list)
    created_at: str = ""
    qaas_version: str = ""
