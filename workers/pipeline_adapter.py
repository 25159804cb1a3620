"""The one place the worker calls the core library: a job row -> ``quant.pipeline.run_quantization``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from quant.recipes.schema import Recipe
from service.db.models import Job
from workers.runner import PipelineOutput


def run_pipeline(job: Job, out_dir: Path, progress: Callable[[float, str], None]) -> PipelineOutput:
    from quant.pipeline import JobSpec, run_quantization

    spec = JobSpec(model_id=job.model_id, recipe=Recipe.model_validate(job.recipe), output_dir=out_dir,
                   device=job.device)
    result = run_quantization(spec, progress)
    return PipelineOutput(artifact_dir=Path(result.artifact_dir), manifest=dict(result.manifest),
                          metrics=dict(result.metrics))
