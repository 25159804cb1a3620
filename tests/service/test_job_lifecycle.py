"""service.jobs: cancel/retry transitions and the reaper (deadline, stale heartbeat, attempts)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy.orm import Session

from service.db.models import Job, JobState
from service.db.session import make_engine, make_session_factory
from service.db.types import utcnow
from service.jobs import TransitionRefused, cancel_job, create_job, reap, retry_job
from service.security import create_api_key
from service.settings import Settings


class RecordingDispatcher:
    def __init__(self) -> None:
        self.enqueued: list[tuple[str, str, str]] = []
        self.revoked: list[str] = []

    def enqueue(self, job_id: str, task_id: str, device: str) -> None:
        self.enqueued.append((job_id, task_id, device))

    def revoke(self, task_id: str) -> None:
        self.revoked.append(task_id)


@pytest.fixture
def session(client, settings: Settings):  # type: ignore[no-untyped-def]  # client: schema migrated
    engine = make_engine(settings.database_url)
    with make_session_factory(engine)() as s:
        yield s
    engine.dispose()


def _job(session: Session, settings: Settings, dispatcher: RecordingDispatcher) -> Job:
    key = create_api_key(session, "lifecycle").record
    session.commit()
    return create_job(session, settings, dispatcher, key.id, "tiny/llama", {"method": {"name": "rtn"}}, None,
                      "cpu", None).job


def _set(session: Session, job: Job, **values) -> None:  # type: ignore[no-untyped-def]
    for k, v in values.items():
        setattr(job, k, v)
    session.commit()


def test_cancel_revokes_and_retry_redispatches(session: Session, settings: Settings) -> None:
    d = RecordingDispatcher()
    job = _job(session, settings, d)
    assert d.enqueued == [(job.id, job.celery_task_id, "cpu")]
    first = job.celery_task_id
    cancel_job(session, d, job)
    assert job.state == JobState.cancelled and d.revoked == [first]
    retry_job(session, settings, d, job)
    assert job.state == JobState.queued and job.celery_task_id != first
    assert d.enqueued[-1] == (job.id, job.celery_task_id, "cpu")
    _set(session, job, state=JobState.succeeded)
    with pytest.raises(TransitionRefused):
        cancel_job(session, d, job)
    with pytest.raises(TransitionRefused):
        retry_job(session, settings, d, job)


def test_reaper_fails_jobs_past_their_deadline(session: Session, settings: Settings) -> None:
    d = RecordingDispatcher()
    queued, running = _job(session, settings, d), _job(session, settings, d)
    past = utcnow() - timedelta(seconds=1)
    _set(session, queued, deadline_at=past)
    _set(session, running, deadline_at=past, state=JobState.running, heartbeat_at=utcnow(), attempts=1)
    report = reap(session, settings, d)
    assert {queued.id, running.id} <= set(report.expired)
    for job in (queued, running):
        session.refresh(job)
        assert job.state == JobState.failed
        assert job.error is not None and job.error.startswith("deadline exceeded")


def test_reaper_requeues_stale_running_jobs_then_gives_up(session: Session, settings: Settings) -> None:
    d = RecordingDispatcher()
    job = _job(session, settings, d)
    stale = utcnow() - timedelta(seconds=settings.heartbeat_stale_seconds + 5)
    old_task = job.celery_task_id
    _set(session, job, state=JobState.running, heartbeat_at=stale, attempts=1, worker="dead:1")
    fresh = _job(session, settings, d)
    _set(session, fresh, state=JobState.running, heartbeat_at=utcnow(), attempts=1)

    report = reap(session, settings, d)
    assert job.id in report.requeued and fresh.id not in report.requeued + report.exhausted
    session.refresh(job)
    assert job.state == JobState.queued and job.celery_task_id != old_task and job.worker is None
    assert "worker lost" in (job.message or "")
    assert d.enqueued[-1] == (job.id, job.celery_task_id, "cpu")

    _set(session, job, state=JobState.running, heartbeat_at=stale, attempts=job.max_attempts)
    report = reap(session, settings, d)
    assert job.id in report.exhausted
    session.refresh(job)
    assert job.state == JobState.failed and "worker lost" in (job.error or "")
    session.refresh(fresh)
    assert fresh.state == JobState.running


def test_enqueue_failure_marks_the_job_failed(session: Session, settings: Settings) -> None:
    from service.dispatch import EnqueueFailed

    class Broken(RecordingDispatcher):
        def enqueue(self, job_id: str, task_id: str, device: str) -> None:
            raise ConnectionError("redis down")

    key = create_api_key(session, "broken").record
    session.commit()
    with pytest.raises(EnqueueFailed):
        create_job(session, settings, Broken(), key.id, "tiny/llama", {"method": {"name": "rtn"}}, None, "cpu", None)
    job = session.query(Job).filter(Job.api_key_id == key.id).one()
    assert job.state == JobState.failed and "broker unavailable" in (job.error or "")
