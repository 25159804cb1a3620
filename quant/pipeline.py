"""One quantization job end to end, as workers and the CLI run it.

``run_quantization(JobSpec, progress)``: load the model (model store) -> calibration and held-out
evaluation data (registered corpora, :mod:`quant.calibration.corpus`) -> floating-point metrics ->
``method.calibrate`` -> quantized metrics (perplexity, agreement with the FP model) -> artifact.

Metrics: causal LMs ``fp_ppl``, ``quant_ppl``, ``ppl_increase_pct``, ``kl_mean``, ``top1_agreement``;
encoders ``cosine_mean``, ``cosine_min``; always ``calibration_seconds``, ``size_bytes_fp``,
``size_bytes_quant``. Progress fractions are monotone in ``[0, 1]``.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Any, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field

from quant.artifacts import ArtifactManifest, save_artifact
from quant.calibration.data import CalibrationData
from quant.evaluation import fp_agreement, model_size_bytes, perplexity
from quant.methods.base import ProgressCallback, get_method, no_progress, sub_progress
from quant.models.store import load_model
from quant.recipes.schema import CalibrationSpec, EvaluationSpec, Recipe


class JobSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model_id: str = Field(min_length=1)
    recipe: Recipe
    artifact_dir: Path
    device: str = "cpu"
    dtype: str = "float32"


class JobResult(BaseModel):
    model_id: str
    model_kind: str
    metrics: dict[str, float]
    artifact_path: Path
    manifest: ArtifactManifest


class DataProvider(Protocol):
    """Where calibration and held-out evaluation sequences come from (default: registered corpora)."""

    def build_calibration(self, tokenizer: Any, spec: CalibrationSpec) -> CalibrationData: ...

    def build_eval_data(self, tokenizer: Any, spec: EvaluationSpec) -> CalibrationData: ...


class CorpusData:
    """The registered offline corpora of :mod:`quant.calibration.corpus`."""

    def build_calibration(self, tokenizer: Any, spec: CalibrationSpec) -> CalibrationData:
        from quant.calibration.corpus import build_calibration

        return build_calibration(tokenizer, spec)

    def build_eval_data(self, tokenizer: Any, spec: EvaluationSpec) -> CalibrationData:
        from quant.calibration.corpus import build_eval_data

        return build_eval_data(tokenizer, spec)


class MonotoneProgress:
    """Forwards progress clamped to [0, 1] and never decreasing."""

    def __init__(self, progress: ProgressCallback) -> None:
        self._progress = progress
        self.last = 0.0

    def __call__(self, fraction: float, message: str) -> None:
        self.last = max(self.last, min(max(float(fraction), 0.0), 1.0))
        self._progress(self.last, message)


def _free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_quantization(
    spec: JobSpec,
    progress: ProgressCallback = no_progress,
    data: DataProvider | None = None,
) -> JobResult:
    report = MonotoneProgress(progress)
    data = data or CorpusData()
    recipe = spec.recipe
    method = get_method(recipe.method.name)  # fail fast on an unknown method

    report(0.0, f"loading {spec.model_id}")
    loaded = load_model(spec.model_id, device=spec.device, dtype=spec.dtype)
    if loaded.tokenizer is None:
        raise ValueError(f"model {spec.model_id!r} ships no tokenizer: calibration text cannot be tokenized")
    model = loaded.model
    report(0.05, "building calibration and evaluation data")
    calibration = data.build_calibration(loaded.tokenizer, recipe.calibration)
    eval_data = data.build_eval_data(loaded.tokenizer, recipe.evaluation)

    metrics: dict[str, float] = {"size_bytes_fp": float(model_size_bytes(model))}
    if loaded.kind == "causal_lm":
        report(0.08, "evaluating the floating-point model")
        metrics["fp_ppl"] = perplexity(model, eval_data).ppl

    report(0.15, f"calibrating with {recipe.method.name}")
    torch.manual_seed(recipe.calibration.seed)
    start = time.perf_counter()
    qmodel = method.calibrate(model, calibration, recipe, sub_progress(report, 0.15, 0.80))
    metrics["calibration_seconds"] = time.perf_counter() - start
    metrics["size_bytes_quant"] = float(model_size_bytes(qmodel))
    del calibration

    report(0.80, "evaluating the quantized model")
    if loaded.kind == "causal_lm":
        metrics["quant_ppl"] = perplexity(qmodel, eval_data).ppl
        metrics["ppl_increase_pct"] = 100.0 * (metrics["quant_ppl"] - metrics["fp_ppl"]) / metrics["fp_ppl"]
    report(0.85, "comparing with the floating-point model")
    fp_model = load_model(spec.model_id, device=spec.device, dtype=spec.dtype).model
    agreement = fp_agreement(fp_model, qmodel, eval_data, top_k=recipe.evaluation.kl_top_k)
    metrics.update(agreement.metrics())
    del fp_model
    _free(spec.device)

    report(0.92, f"saving the artifact to {spec.artifact_dir}")
    manifest = save_artifact(
        qmodel,
        spec.artifact_dir,
        ArtifactManifest(base_model_id=spec.model_id, recipe=recipe, metrics=metrics),
        tokenizer=loaded.tokenizer,
        tokenizer_source=loaded.path,
    )
    report(1.0, "done")
    return JobResult(
        model_id=spec.model_id,
        model_kind=loaded.kind,
        metrics=metrics,
        artifact_path=Path(spec.artifact_dir),
        manifest=manifest,
    )
