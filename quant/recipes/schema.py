"""The quantization recipe: what a user submits, validated at the boundary.

A recipe names the method (with its own hyper-parameters, discriminated by ``method.name``),
weight / activation / KV-cache quantization settings, calibration data and evaluation settings.
Every invalid value fails pydantic validation with the offending field in the error location,
which the service turns into a 422 naming that field.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

FP_BITS = 16


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GPTQSpec(StrictModel):
    """GPTQ weight-rounding settings (used when ``weight.algorithm == 'gptq'``)."""

    damp_percent: float = Field(0.01, gt=0.0, le=1.0, description="Hessian dampening as a fraction of mean diagonal")
    block_size: int = Field(128, ge=1, le=4096, description="columns processed per lazy-batch block")
    act_order: bool = Field(True, description="quantize columns in order of decreasing Hessian diagonal")
    static_groups: bool = Field(False, description="compute group scales before reordering")


class WeightQuantSpec(StrictModel):
    bits: int = Field(8, description="weight bit-width; 16 keeps weights in floating point")
    granularity: Literal["per_channel", "per_group", "per_tensor"] = "per_channel"
    group_size: int | None = Field(None, description="input channels per group; required for per_group")
    symmetric: bool = True
    clip_search: bool = Field(
        True, description="search a per-channel clipping ratio minimising weight reconstruction error"
    )
    algorithm: Literal["rtn", "gptq"] = Field("rtn", description="how weights are rounded")
    gptq: GPTQSpec = Field(default_factory=GPTQSpec)

    @model_validator(mode="after")
    def _check(self) -> "WeightQuantSpec":
        if self.bits not in (2, 3, 4, 6, 8, FP_BITS):
            raise ValueError(f"bits must be one of 2, 3, 4, 6, 8 or 16, got {self.bits}")
        if self.granularity == "per_group":
            if self.group_size is None:
                raise ValueError("group_size is required when granularity is per_group")
            if self.group_size < 8 or self.group_size & (self.group_size - 1):
                raise ValueError("group_size must be a power of two of at least 8")
        elif self.group_size is not None:
            raise ValueError("group_size is only valid with granularity per_group")
        return self

    @property
    def enabled(self) -> bool:
        return self.bits < FP_BITS


class ActivationQuantSpec(StrictModel):
    bits: int = Field(8, description="activation bit-width; 16 keeps activations in floating point")
    granularity: Literal["per_token", "per_tensor"] = "per_token"
    symmetric: bool = True
    clip_ratio: float = Field(1.0, gt=0.0, le=1.0, description="fraction of the dynamic range kept")

    @model_validator(mode="after")
    def _check(self) -> "ActivationQuantSpec":
        if self.bits not in (4, 6, 8, FP_BITS):
            raise ValueError(f"bits must be one of 4, 6, 8 or 16, got {self.bits}")
        return self

    @property
    def enabled(self) -> bool:
        return self.bits < FP_BITS


class KVCacheQuantSpec(StrictModel):
    bits: int = Field(FP_BITS, description="KV-cache bit-width: 4, 8, or 16 for none")
    symmetric: bool = False
    clip_ratio: float = Field(1.0, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _check(self) -> "KVCacheQuantSpec":
        if self.bits not in (4, 8, FP_BITS):
            raise ValueError(f"bits must be 4, 8 or 16, got {self.bits}")
        return self

    @property
    def enabled(self) -> bool:
        return self.bits < FP_BITS


class CalibrationSpec(StrictModel):
    source: str = Field("default", min_length=1, description="registered calibration corpus name")
    num_samples: int = Field(128, ge=1, le=4096)
    seq_len: int = Field(512, ge=16, le=16384)
    seed: int = Field(0, ge=0)
    batch_size: int = Field(4, ge=1, le=512)


class EvaluationSpec(StrictModel):
    corpus: str = Field("default", min_length=1)
    num_samples: int = Field(64, ge=1, le=4096, description="held-out sequences for perplexity / agreement")
    seq_len: int = Field(512, ge=16, le=16384)
    kl_top_k: int = Field(0, ge=0, description="0: full-vocabulary KL; >0: KL over the FP model's top-k tokens")


# ---------------------------------------------------------------- method hyper-parameters


class RTNParams(StrictModel):
    name: Literal["rtn"] = "rtn"


class GPTQParams(StrictModel):
    """GPTQ as a method: RTN activations, GPTQ-rounded weights."""

    name: Literal["gptq"] = "gptq"


#: SmoothQuant's default alpha candidates for ``alpha="auto"``: 0.0, 0.05, ..., 1.0
DEFAULT_ALPHA_GRID: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(21))


def _check_alpha(value: float, field: str) -> float:
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{field} must lie in [0, 1], got {value}")
    return value


class SmoothQuantParams(StrictModel):
    """``alpha``: one migration strength for every group, or ``"auto"``: per linear group, the
    candidate of ``alpha_grid`` (or no smoothing at all) whose smoothed, fake-quantized output on
    ``search_tokens`` sampled calibration tokens is closest (MSE) to the FP output."""

    name: Literal["smoothquant"] = "smoothquant"
    alpha: float | Literal["auto"] = Field(
        0.5, description="migration strength in [0, 1], or 'auto' to search it per linear group"
    )
    alpha_grid: tuple[float, ...] = Field(
        DEFAULT_ALPHA_GRID, min_length=1, max_length=101,
        description="alpha candidates tried by alpha='auto' (no smoothing is always tried as well)",
    )
    search_tokens: int = Field(
        1024, ge=16, le=65536, description="calibration tokens per group scoring each alpha='auto' candidate"
    )

    @field_validator("alpha")
    @classmethod
    def _alpha_in_range(cls, value: float | str) -> float | str:
        return value if value == "auto" else _check_alpha(float(value), "alpha")

    @field_validator("alpha_grid")
    @classmethod
    def _grid_in_range(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        return tuple(sorted({_check_alpha(float(a), "alpha_grid values") for a in value}))

    @property
    def auto(self) -> bool:
        return self.alpha == "auto"


class OSPlusParams(StrictModel):
    name: Literal["osplus"] = "osplus"
    shift: bool = Field(True, description="channel-wise shifting (removes asymmetry)")
    scale: bool = Field(True, description="channel-wise scaling (migrates outliers)")
    search_grid: int = Field(20, ge=2, le=200, description="candidate outlier thresholds tried by the scale search")
    search_tokens: int = Field(2048, ge=16, description="tokens used to score each candidate")


class QuaRotParams(StrictModel):
    name: Literal["quarot"] = "quarot"
    seed: int = Field(0, ge=0, description="seed of the random Hadamard sign flips")
    online_down_proj: bool = Field(True, description="online Hadamard before the MLP output projection")


class FlatQuantParams(StrictModel):
    name: Literal["flatquant"] = "flatquant"
    epochs: int = Field(15, ge=0, le=1000)
    lr: float = Field(5e-3, gt=0.0, le=1.0)
    learn_clip: bool = True
    learn_scale: bool = Field(True, description="per-channel smoothing scale before the affine transform")
    diag_init: Literal["sq", "one"] = "sq"
    warmup: bool = True
    diag_alpha: float = Field(0.3, ge=0.0, le=1.0, description="migration strength of the SmoothQuant-style diag init")
    seed: int = Field(0, ge=0, description="seed of the random orthogonal initialisation of the transforms")
    amp: bool = Field(True, description="bfloat16 autocast for the block training on CUDA (FP32 on CPU)")


class OSTQuantParams(StrictModel):
    name: Literal["ostquant"] = "ostquant"
    epochs: int = Field(15, ge=0, le=1000)
    lr_rotation: float = Field(1.5, gt=0.0, le=100.0, description="Cayley-SGD learning rate of the rotations")
    lr_scale: float = Field(1e-2, gt=0.0, le=1.0)
    kl_top_k: int = Field(1000, ge=1, description="KL-Top loss: tokens of the FP distribution compared")
    end_to_end: bool = Field(True, description="train against the model output (KL-Top); else block-wise MSE")


MethodSpec = Annotated[
    Union[RTNParams, GPTQParams, SmoothQuantParams, OSPlusParams, QuaRotParams, FlatQuantParams, OSTQuantParams],
    Field(discriminator="name"),
]

METHOD_NAMES: tuple[str, ...] = ("rtn", "gptq", "smoothquant", "osplus", "quarot", "flatquant", "ostquant")


class Recipe(StrictModel):
    """A complete, validated quantization recipe."""

    name: str | None = Field(None, max_length=128)
    method: MethodSpec
    weight: WeightQuantSpec = Field(default_factory=WeightQuantSpec)
    activation: ActivationQuantSpec = Field(default_factory=ActivationQuantSpec)
    kv_cache: KVCacheQuantSpec = Field(default_factory=KVCacheQuantSpec)
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    skip_modules: tuple[str, ...] = Field(
        ("lm_head",), description="module-name suffixes kept in floating point"
    )

    @property
    def bits_label(self) -> str:
        label = f"W{self.weight.bits}A{self.activation.bits}"
        if self.weight.granularity == "per_group":
            label += f"-g{self.weight.group_size}"
        if self.kv_cache.enabled:
            label += f"KV{self.kv_cache.bits}"
        return label

    # ------------------------------------------------------------ (de)serialisation
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Recipe":
        return cls.model_validate(data)

    @classmethod
    def from_json(cls, text: str) -> "Recipe":
        return cls.model_validate_json(text)

    @classmethod
    def from_yaml(cls, text: str) -> "Recipe":
        data = yaml.safe_load(text)
        if not isinstance(data, dict):
            raise ValueError("a recipe document must be a mapping")
        return cls.model_validate(data)

    @classmethod
    def from_file(cls, path: str | Path) -> "Recipe":
        path = Path(path)
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            return cls.from_yaml(text)
        return cls.from_json(text)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def canonical_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
