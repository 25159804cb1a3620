"""The Celery application (Redis broker and result backend) and the service's dispatcher.

Delivery guarantees: ``acks_late`` + ``reject_on_worker_lost`` keep a message on the broker until
its task returns, so a worker killed mid-job (SIGKILL, OOM, node loss) gets the job redelivered;
``task_acks_on_failure_or_timeout=True`` acks tasks that *raised* or hit the hard time limit,
because the task has already recorded the failure reason in the database (a poison message must
not loop). ``worker_prefetch_multiplier=1`` so an idle worker never hoards a second long job.
The database is the source of truth: a task only runs a job it can claim with a compare-and-set
on (job id, Celery task id, state), so redeliveries and re-dispatches never run a job twice, and
the reaper (beat, every ``QAAS_REAPER_INTERVAL_SECONDS``) requeues jobs whose worker went silent.
"""

from __future__ import annotations

from celery import Celery
from kombu import Exchange, Queue

from service.dispatch import QUANTIZE_TASK, REAP_TASK, queue_for_device
from service.settings import Settings

CPU_QUEUE, GPU_QUEUE = "cpu", "gpu"


def create_celery_app(settings: Settings) -> Celery:
    app = Celery("qaas", broker=settings.redis_url, backend=settings.backend_url, include=["workers.tasks"])
    transport = {"visibility_timeout": settings.broker_visibility_timeout_seconds}
    app.conf.update(
        qaas_settings=settings,
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        worker_max_tasks_per_child=20,
        task_time_limit=settings.job_deadline_seconds + 120,
        task_queues=(Queue(CPU_QUEUE, Exchange(CPU_QUEUE), routing_key=CPU_QUEUE),
                     Queue(GPU_QUEUE, Exchange(GPU_QUEUE), routing_key=GPU_QUEUE)),
        task_default_queue=CPU_QUEUE,
        task_routes={REAP_TASK: {"queue": CPU_QUEUE}},
        broker_transport_options=transport,
        result_backend_transport_options=transport,
        result_expires=24 * 3600,
        broker_connection_retry_on_startup=True,
        beat_schedule={
            "reap-jobs": {"task": REAP_TASK, "schedule": settings.reaper_interval_seconds, "options": {"expires": 60}}
        },
    )
    return app


class CeleryDispatcher:
    """:class:`service.dispatch.Dispatcher` over Celery: route by device, revoke on cancel."""

    def __init__(self, app: Celery) -> None:
        self.app = app

    def enqueue(self, job_id: str, task_id: str, device: str) -> None:
        self.app.send_task(QUANTIZE_TASK, args=[job_id], task_id=task_id, queue=queue_for_device(device))

    def revoke(self, task_id: str) -> None:
        self.app.control.revoke(task_id)


app = create_celery_app(Settings())
