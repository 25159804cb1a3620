"""Job lifecycle shared by the API and the workers.

Every state transition is a compare-and-set ``UPDATE ... WHERE`` on the row's state (and, for
worker-side transitions, on the Celery task id that owns the execution), so a cancelled, reaped
or re-dispatched job can never be overwritten by a stale worker.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.engine import CursorResult
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.db.models import ACTIVE_STATES, Artifact, Job, JobState, Metric
from service.db.types import utcnow
from service.dispatch import Dispatcher, EnqueueFailed
from service.settings import Settings


def new_task_id() -> str:
    return uuid.uuid4().hex


def request_fingerprint(model_id: str, recipe: dict[str, Any], device: str) -> str:
    body = json.dumps({"model_id": model_id, "recipe": recipe, "device": device}, sort_keys=True,
                      separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()


class IdempotencyConflict(Exception):
    def __init__(self, job: Job) -> None:
        super().__init__("Idempotency-Key reused with a different request")
        self.job = job


@dataclass
class Created:
    job: Job
    created: bool


def _rowcount(result: Any) -> int:
    return int(result.rowcount) if isinstance(result, CursorResult) else 0


def create_job(
    session: Session,
    settings: Settings,
    dispatcher: Dispatcher,
    api_key_id: int,
    model_id: str,
    recipe: dict[str, Any],
    recipe_name: str | None,
    device: str,
    idempotency_key: str | None,
) -> Created:
    """Insert a queued job and enqueue it; with an Idempotency-Key, a repeat returns the first job."""
    fingerprint = request_fingerprint(model_id, recipe, device)
    if idempotency_key is not None:
        existing = _by_idempotency_key(session, api_key_id, idempotency_key)
        if existing is not None:
            if existing.request_hash != fingerprint:
                raise IdempotencyConflict(existing)
            return Created(existing, False)
    now = utcnow()
    job = Job(
        api_key_id=api_key_id,
        model_id=model_id,
        recipe=recipe,
        recipe_name=recipe_name,
        device=device,
        state=JobState.queued,
        progress=0,
        message="queued",
        attempts=0,
        max_attempts=settings.max_attempts,
        idempotency_key=idempotency_key,
        request_hash=fingerprint,
        celery_task_id=new_task_id(),
        deadline_at=now + timedelta(seconds=settings.job_deadline_seconds),
        created_at=now,
        updated_at=now,
    )
    session.add(job)
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        if idempotency_key is None:
            raise
        existing = _by_idempotency_key(session, api_key_id, idempotency_key)
        if existing is None:
            raise
        if existing.request_hash != fingerprint:
            raise IdempotencyConflict(existing) from None
        return Created(existing, False)
    _dispatch(session, dispatcher, job)
    return Created(job, True)


def _by_idempotency_key(session: Session, api_key_id: int, key: str) -> Job | None:
    return session.scalar(select(Job).where(Job.api_key_id == api_key_id, Job.idempotency_key == key))


def _dispatch(session: Session, dispatcher: Dispatcher, job: Job) -> None:
    assert job.celery_task_id is not None
    try:
        dispatcher.enqueue(job.id, job.celery_task_id, job.device)
    except Exception as exc:  # noqa: BLE001 - any broker failure: the job must not stay queued forever
        fail_job(session, job.id, f"could not enqueue the job: broker unavailable ({type(exc).__name__})",
                 expected=(JobState.queued,))
        session.commit()
        session.refresh(job)
        raise EnqueueFailed(str(exc)) from exc


def fail_job(session: Session, job_id: str, reason: str, expected: tuple[JobState, ...] = ACTIVE_STATES,
             task_id: str | None = None) -> bool:
    now = utcnow()
    stmt = update(Job).where(Job.id == job_id, Job.state.in_(expected))
    if task_id is not None:
        stmt = stmt.where(Job.celery_task_id == task_id)
    result = session.execute(
        stmt.values(state=JobState.failed, error=reason, message="failed", finished_at=now, updated_at=now)
    )
    return _rowcount(result) == 1


class TransitionRefused(Exception):
    def __init__(self, job: Job, action: str) -> None:
        super().__init__(f"cannot {action} a job in state {job.state.value}")
        self.job = job


def cancel_job(session: Session, dispatcher: Dispatcher, job: Job) -> Job:
    """queued/running -> cancelled (running workers notice at their next progress step)."""
    if job.state == JobState.cancelled:
        return job
    now = utcnow()
    result = session.execute(
        update(Job)
        .where(Job.id == job.id, Job.state.in_(ACTIVE_STATES))
        .values(state=JobState.cancelled, message="cancelled by request", finished_at=now, updated_at=now)
    )
    session.commit()
    session.refresh(job)
    if _rowcount(result) != 1:
        if job.state == JobState.cancelled:
            return job
        raise TransitionRefused(job, "cancel")
    if job.celery_task_id:
        try:
            dispatcher.revoke(job.celery_task_id)
        except Exception:  # noqa: BLE001 - revocation is an optimisation; the state check is authoritative
            pass
    return job


def retry_job(session: Session, settings: Settings, dispatcher: Dispatcher, job: Job) -> Job:
    """failed/cancelled -> queued with a fresh attempt budget, deadline and task id."""
    now = utcnow()
    task_id = new_task_id()
    result = session.execute(
        update(Job)
        .where(Job.id == job.id, Job.state.in_((JobState.failed, JobState.cancelled)))
        .values(state=JobState.queued, progress=0, message="queued (retry)", error=None, attempts=0,
                celery_task_id=task_id, worker=None, heartbeat_at=None, started_at=None, finished_at=None,
                deadline_at=now + timedelta(seconds=settings.job_deadline_seconds), updated_at=now)
    )
    if _rowcount(result) != 1:
        session.rollback()
        session.refresh(job)
        raise TransitionRefused(job, "retry")
    session.execute(delete(Metric).where(Metric.job_id == job.id))
    session.execute(delete(Artifact).where(Artifact.job_id == job.id))
    session.commit()
    session.refresh(job)
    _dispatch(session, dispatcher, job)
    return job


# ------------------------------------------------------------------------------------------ reaper
@dataclass
class ReapReport:
    expired: list[str] = field(default_factory=list)  # failed: past their deadline
    requeued: list[str] = field(default_factory=list)  # worker lost, dispatched again
    exhausted: list[str] = field(default_factory=list)  # worker lost too often: failed

    def as_dict(self) -> dict[str, list[str]]:
        return {"expired": self.expired, "requeued": self.requeued, "exhausted": self.exhausted}


def reap(session: Session, settings: Settings, dispatcher: Dispatcher, now: datetime | None = None) -> ReapReport:
    """Fail jobs past their deadline; requeue (or fail, once out of attempts) running jobs whose
    worker stopped heart-beating. Safe to run concurrently from beat and the API (CAS updates)."""
    now = now or utcnow()
    report = ReapReport()
    for job_id, state in session.execute(
        select(Job.id, Job.state).where(Job.state.in_(ACTIVE_STATES), Job.deadline_at < now)
    ).all():
        reason = f"deadline exceeded: not finished within {settings.job_deadline_seconds}s (was {state.value})"
        if fail_job(session, job_id, reason, expected=(state,)):
            report.expired.append(job_id)
    session.commit()

    stale_before = now - timedelta(seconds=settings.heartbeat_stale_seconds)
    stale = session.execute(
        select(Job.id, Job.celery_task_id, Job.attempts, Job.max_attempts, Job.heartbeat_at).where(
            Job.state == JobState.running, Job.heartbeat_at < stale_before
        )
    ).all()
    to_dispatch: list[str] = []
    for job_id, task_id, attempts, max_attempts, beat in stale:
        silent = (now - beat).total_seconds() if beat else float("inf")
        if attempts >= max_attempts:
            reason = (f"worker lost: no heartbeat for {silent:.0f}s on attempt {attempts} of {max_attempts}; "
                      "giving up")
            if fail_job(session, job_id, reason, expected=(JobState.running,), task_id=task_id):
                report.exhausted.append(job_id)
            continue
        result = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.state == JobState.running, Job.celery_task_id == task_id)
            .values(state=JobState.queued, celery_task_id=new_task_id(), worker=None, heartbeat_at=None,
                    message=f"requeued: worker lost (no heartbeat for {silent:.0f}s)", updated_at=now)
        )
        if _rowcount(result) == 1:
            to_dispatch.append(job_id)
    session.commit()
    for job_id in to_dispatch:
        job = session.get(Job, job_id)
        if job is None or job.state != JobState.queued:
            continue
        try:
            _dispatch(session, dispatcher, job)
            report.requeued.append(job_id)
        except EnqueueFailed:
            report.exhausted.append(job_id)
    return report
