"""Celery tasks: ``quantize_job(job_id)`` and the periodic ``reap_jobs``."""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

from celery import Task, signals
from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from service.db.migrate import ensure_schema
from service.db.session import make_engine, make_session_factory
from service.dispatch import QUANTIZE_TASK, REAP_TASK
from service.jobs import reap
from service.settings import Settings
from workers.app import CeleryDispatcher, app
from workers.pipeline_adapter import run_pipeline
from workers.runner import ClaimOutcome, execute_job

log = logging.getLogger("workers.tasks")
DB_RETRY_SECONDS = 15
DB_MAX_RETRIES = 40


class QaasTask(Task):
    """Per-process database resources, created lazily in the (forked) pool process."""

    abstract = True
    _engine: Engine | None = None
    _factory: sessionmaker[Session] | None = None
    _pid: int | None = None

    @property
    def settings(self) -> Settings:
        return self.app.conf.qaas_settings

    @property
    def session_factory(self) -> sessionmaker[Session]:
        if self._factory is None or self._pid != os.getpid():
            self._engine = make_engine(self.settings.database_url)
            self._factory = make_session_factory(self._engine)
            self._pid = os.getpid()
        return self._factory


@signals.after_setup_logger.connect
def _redact_worker_logs(logger: logging.Logger, **_: Any) -> None:
    from service.logging_setup import RedactSecrets

    for handler in logger.handlers:
        handler.addFilter(RedactSecrets())


@signals.worker_init.connect
def _check_schema(**_: Any) -> None:
    """Workers never migrate: refuse to start against a database that is not at head."""
    settings: Settings = app.conf.qaas_settings
    settings.ensure_dirs()
    engine = make_engine(settings.database_url)
    try:
        ensure_schema(engine, auto_migrate=False)
    finally:
        engine.dispose()


def _worker_name(task: Task) -> str:
    return f"{task.request.hostname or socket.gethostname()}:{os.getpid()}"


@app.task(bind=True, base=QaasTask, name=QUANTIZE_TASK, acks_late=True, reject_on_worker_lost=True,
          max_retries=None)
def quantize_job(self: QaasTask, job_id: str) -> dict[str, Any]:
    settings = self.settings
    if settings.worker_threads:
        import torch

        torch.set_num_threads(settings.worker_threads)
    task_id = self.request.id
    try:
        claim = execute_job(self.session_factory, settings, job_id, task_id, _worker_name(self), run_pipeline)
    except OperationalError as exc:
        # the database is unreachable: keep the message alive instead of acking a job nobody recorded
        log.warning("job %s: database unavailable (%s); retrying", job_id, type(exc).__name__)
        raise self.retry(exc=exc, countdown=DB_RETRY_SECONDS, max_retries=DB_MAX_RETRIES) from None
    if claim.outcome is ClaimOutcome.busy:
        # a redelivered message while the previous execution's heartbeat is still fresh: look again
        # once it would be stale (the previous worker died) — or find the job finished.
        raise self.retry(countdown=settings.heartbeat_stale_seconds, max_retries=settings.max_attempts * 4)
    return {"job_id": job_id, "outcome": claim.outcome.value, "attempt": claim.attempt}


@app.task(bind=True, base=QaasTask, name=REAP_TASK, acks_late=False)
def reap_jobs(self: QaasTask) -> dict[str, list[str]]:
    with self.session_factory() as session:
        report = reap(session, self.settings, CeleryDispatcher(self.app))
    if any(report.as_dict().values()):
        log.info("reaper: %s", report.as_dict())
    return report.as_dict()

