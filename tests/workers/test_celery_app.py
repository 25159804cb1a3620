"""workers.app: delivery settings, queues, routing and the reaper schedule."""

from __future__ import annotations

from kombu import Queue

from service.dispatch import QUANTIZE_TASK, REAP_TASK, queue_for_device
from service.settings import Settings
from workers.app import CeleryDispatcher, create_celery_app


def test_delivery_guarantees_and_queues() -> None:
    settings = Settings(redis_url="redis://127.0.0.1:6379/15", reaper_interval_seconds=7,
                        broker_visibility_timeout_seconds=123, job_deadline_seconds=1000)
    app = create_celery_app(settings)
    conf = app.conf
    assert conf.task_acks_late and conf.task_reject_on_worker_lost and conf.task_acks_on_failure_or_timeout
    assert conf.worker_prefetch_multiplier == 1
    assert {q.name for q in conf.task_queues if isinstance(q, Queue)} == {"cpu", "gpu"}
    assert conf.broker_url == conf.result_backend == "redis://127.0.0.1:6379/15"
    assert conf.broker_transport_options["visibility_timeout"] == 123
    assert conf.task_time_limit == 1000 + 120
    assert conf.beat_schedule["reap-jobs"]["task"] == REAP_TASK
    assert conf.beat_schedule["reap-jobs"]["schedule"] == 7
    assert conf.qaas_settings is settings


def test_tasks_are_registered_with_late_acks() -> None:
    from workers.tasks import quantize_job, reap_jobs

    assert quantize_job.name == QUANTIZE_TASK and reap_jobs.name == REAP_TASK
    assert quantize_job.acks_late and quantize_job.reject_on_worker_lost


def test_device_routing() -> None:
    assert queue_for_device("cuda") == "gpu" and queue_for_device("cuda:1") == "gpu"
    assert queue_for_device("cpu") == "cpu"

    sent: list[tuple[str, dict]] = []

    class App:
        def send_task(self, name: str, **kwargs) -> None:  # type: ignore[no-untyped-def]
            sent.append((name, kwargs))

    CeleryDispatcher(App()).enqueue("job1", "task1", "cuda")  # type: ignore[arg-type]
    assert sent == [(QUANTIZE_TASK, {"args": ["job1"], "task_id": "task1", "queue": "gpu"})]
