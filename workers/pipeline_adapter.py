"""The one place the worker calls the core library: a job row -> ``quant.pipeline.run_quantization``.

Imported by the worker's main process at startup (via ``workers.tasks``), so torch, transformers and
the methods are loaded once before the pool forks, not on every job. Importing torch does not
initialise CUDA, so forked pool processes can still use the GPU.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from quant.pipeline import JobSpec, run_quantization
from quant.recipes.schema import Recipe
from service.db.models import Job
from workers.runner import PipelineOutput


def run_pipeline(job: Job, out_dir: Path, progress: Callable[[float, str], None]) -> PipelineOutput:
    spec = JobSpec(model_id=job.model_id, recipe=Recipe.model_validate(job.recipe), artifact_dir=out_dir,
                   device=job.device)
    result = run_quantization(spec, progress)
    return PipelineOutput(artifact_dir=Path(result.artifact_path), manifest=result.manifest.model_dump(mode="json"),
                          metrics={**result.metrics, "model_kind": result.model_kind})
