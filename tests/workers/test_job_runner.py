"""workers.runner against real PostgreSQL with a stand-in pipeline: claim CAS, heartbeat,
throttled progress, cancellation between steps, success and failure recording."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from service.db.models import Job, JobState
from service.db.types import utcnow
from service.jobs import create_job
from service.security import create_api_key
from service.settings import Settings
from workers.runner import ClaimOutcome, Heartbeat, JobAborted, PipelineOutput, ProgressWriter, claim_job, execute_job


class NullDispatcher:
    def enqueue(self, job_id: str, task_id: str, device: str) -> None:
        return None

    def revoke(self, task_id: str) -> None:
        return None


def _new_job(factory: sessionmaker[Session], settings: Settings) -> tuple[str, str]:
    with factory() as s:
        key = create_api_key(s, "runner").record
        s.commit()
        job = create_job(s, settings, NullDispatcher(), key.id, "m", {"method": {"name": "rtn"}}, None, "cpu",
                         None).job
        assert job.celery_task_id is not None
        return job.id, job.celery_task_id


def _get(factory: sessionmaker[Session], job_id: str) -> Job:
    with factory() as s:
        job = s.get(Job, job_id)
        assert job is not None
        s.expunge(job)
        return job


def _writing_pipeline(steps: int = 3):  # type: ignore[no-untyped-def]
    def run(job: Job, out: Path, progress) -> PipelineOutput:  # type: ignore[no-untyped-def]
        for i in range(steps):
            progress((i + 1) / (steps + 1), f"step {i}")
        (out / "model.safetensors").write_bytes(b"weights")
        (out / "manifest.json").write_text('{"method": "rtn"}')
        return PipelineOutput(out, {"method": "rtn"}, {"kl": 0.25, "eval": {"ppl": 9.5}, "label": "W8A8"})

    return run


def test_claim_is_exclusive_and_checks_the_task_id(factory, worker_settings) -> None:  # type: ignore[no-untyped-def]
    job_id, task_id = _new_job(factory, worker_settings)
    assert claim_job(factory, worker_settings, job_id, "someone-else", "w:1").outcome is ClaimOutcome.skip
    first = claim_job(factory, worker_settings, job_id, task_id, "w:1")
    assert first.outcome is ClaimOutcome.claimed and first.attempt == 1
    # a redelivered copy while the heartbeat is fresh waits; once stale it takes over as attempt 2
    assert claim_job(factory, worker_settings, job_id, task_id, "w:2").outcome is ClaimOutcome.busy
    with factory() as s:
        s.get(Job, job_id).heartbeat_at = utcnow() - timedelta(seconds=60)  # type: ignore[union-attr]
        s.commit()
    second = claim_job(factory, worker_settings, job_id, task_id, "w:2")
    assert second.outcome is ClaimOutcome.claimed and second.attempt == 2
    with factory() as s:
        job = s.get(Job, job_id)
        job.heartbeat_at = utcnow() - timedelta(seconds=60)  # type: ignore[union-attr]
        job.attempts = job.max_attempts  # type: ignore[union-attr]
        s.commit()
    assert claim_job(factory, worker_settings, job_id, task_id, "w:3").outcome is ClaimOutcome.failed
    job = _get(factory, job_id)
    assert job.state == JobState.failed and "without finishing" in (job.error or "")


def test_success_records_artifact_metrics_and_progress(factory, worker_settings) -> None:  # type: ignore[no-untyped-def]
    job_id, task_id = _new_job(factory, worker_settings)
    claim = execute_job(factory, worker_settings, job_id, task_id, "w:1", _writing_pipeline())
    assert claim.outcome is ClaimOutcome.claimed
    with factory() as s:
        job = s.get(Job, job_id)
        assert job is not None
        assert job.state == JobState.succeeded and job.progress == 100 and job.finished_at is not None
        assert job.artifact is not None and job.artifact.size_bytes == len(b"weights") + len('{"method": "rtn"}')
        assert len(job.artifact.sha256) == 64 and Path(job.artifact.path).is_dir()
        assert {m.key: (m.value, m.text) for m in job.metrics} == {
            "kl": (0.25, None), "eval.ppl": (9.5, None), "label": (None, "W8A8")}


def test_failure_is_recorded_with_the_reason(factory, worker_settings) -> None:  # type: ignore[no-untyped-def]
    job_id, task_id = _new_job(factory, worker_settings)

    def broken(job, out, progress):  # type: ignore[no-untyped-def]
        progress(0.1, "loading")
        raise RuntimeError("calibration produced NaNs")

    execute_job(factory, worker_settings, job_id, task_id, "w:1", broken)
    job = _get(factory, job_id)
    assert job.state == JobState.failed and job.error == "RuntimeError: calibration produced NaNs"
    assert not list((worker_settings.artifact_dir / job_id).glob("attempt-*/*"))


def test_cancel_between_progress_steps_stops_the_job(factory, worker_settings) -> None:  # type: ignore[no-untyped-def]
    job_id, task_id = _new_job(factory, worker_settings)
    steps_run = []

    def slow(job, out, progress):  # type: ignore[no-untyped-def]
        for i in range(50):
            if i == 2:
                with factory() as s:
                    s.get(Job, job_id).state = JobState.cancelled  # type: ignore[union-attr]
                    s.commit()
            progress(i / 50, f"step {i}")
            steps_run.append(i)
        return PipelineOutput(out, {}, {})

    execute_job(factory, worker_settings, job_id, task_id, "w:1", slow)
    assert steps_run == [0, 1]  # the write at step 2 lost its CAS and aborted
    job = _get(factory, job_id)
    assert job.state == JobState.cancelled and job.artifact is None


def test_progress_writes_are_throttled(factory, worker_settings) -> None:  # type: ignore[no-untyped-def]
    job_id, task_id = _new_job(factory, worker_settings)
    assert claim_job(factory, worker_settings, job_id, task_id, "w:1").outcome is ClaimOutcome.claimed
    now = [0.0]
    with Heartbeat(factory, job_id, task_id, interval=30) as beat:
        writer = ProgressWriter(factory, job_id, task_id, min_interval=1.0, heartbeat=beat, clock=lambda: now[0])
        for i in range(100):
            writer(i / 1000, "tiny step")  # 0..9.9%: within one interval, under 10 points
        assert writer.writes == 1
        writer(0.5, "big jump")
        now[0] = 5.0
        writer(0.51, "later")
        assert writer.writes == 3
    assert _get(factory, job_id).progress == 51


def test_heartbeat_keeps_the_job_alive_and_notices_loss(factory, worker_settings) -> None:  # type: ignore[no-untyped-def]
    job_id, task_id = _new_job(factory, worker_settings)
    claim_job(factory, worker_settings, job_id, task_id, "w:1")
    before = _get(factory, job_id).heartbeat_at
    with Heartbeat(factory, job_id, task_id, interval=0.1) as beat:
        time.sleep(0.5)
        assert _get(factory, job_id).heartbeat_at > before  # type: ignore[operator]
        with factory() as s:
            s.get(Job, job_id).state = JobState.cancelled  # type: ignore[union-attr]
            s.commit()
        assert beat.lost.wait(2.0)
        writer = ProgressWriter(factory, job_id, task_id, 0.0, beat)
        with pytest.raises(JobAborted):
            writer(0.5, "x")
