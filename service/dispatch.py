"""How the service hands jobs to workers. The Celery implementation lives in workers.app; tests may
pass any object with these two methods."""

from __future__ import annotations

from typing import Protocol

QUANTIZE_TASK = "workers.tasks.quantize_job"
REAP_TASK = "workers.tasks.reap_jobs"


def queue_for_device(device: str) -> str:
    """GPU jobs go to the ``gpu`` queue (workers with CUDA), everything else to ``cpu``."""
    return "gpu" if device.startswith("cuda") else "cpu"


class Dispatcher(Protocol):
    def enqueue(self, job_id: str, task_id: str, device: str) -> None: ...

    def revoke(self, task_id: str) -> None: ...


class EnqueueFailed(RuntimeError):
    pass
