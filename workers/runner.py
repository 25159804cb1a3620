"""Executing one job inside a worker: claim, heartbeat, progress, result, failure.

Everything here talks to the database through compare-and-set updates keyed on
(job id, Celery task id, state); losing a CAS means the job was cancelled, reaped or re-dispatched
and this execution must stop without writing anything else.
"""

from __future__ import annotations

import enum
import json
import logging
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import and_, or_, update
from sqlalchemy.orm import Session, sessionmaker

from service.archive import folder_digest
from service.db.models import Artifact, Job, JobState, Metric
from service.db.session import session_scope
from service.db.types import utcnow
from service.jobs import fail_job
from service.settings import Settings

log = logging.getLogger("workers.runner")


class JobAborted(Exception):
    """The job is no longer ours (cancelled, reaped, deadline): stop quietly."""


class ClaimOutcome(enum.Enum):
    claimed = "claimed"
    skip = "skip"  # nothing to do: terminal, superseded by another task id, or unknown
    busy = "busy"  # another live execution holds it: look again once its heartbeat could be stale
    failed = "failed"  # out of attempts or past the deadline: recorded as failed


@dataclass
class Claim:
    outcome: ClaimOutcome
    attempt: int = 0
    detail: str = ""


def claim_job(factory: sessionmaker[Session], settings: Settings, job_id: str, task_id: str, worker: str) -> Claim:
    now = utcnow()
    stale_before = now - timedelta(seconds=settings.heartbeat_stale_seconds)
    with session_scope(factory) as session:
        result = session.execute(
            update(Job)
            .where(
                Job.id == job_id,
                Job.celery_task_id == task_id,
                Job.attempts < Job.max_attempts,
                Job.deadline_at > now,
                or_(Job.state == JobState.queued,
                    and_(Job.state == JobState.running,
                         or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < stale_before))),
            )
            .values(state=JobState.running, attempts=Job.attempts + 1, worker=worker, heartbeat_at=now,
                    started_at=now, progress=0, message="starting", error=None, updated_at=now)
        )
        if result.rowcount == 1:  # type: ignore[attr-defined]
            job = session.get(Job, job_id)
            assert job is not None
            return Claim(ClaimOutcome.claimed, attempt=job.attempts)
        job = session.get(Job, job_id)
        if job is None or job.celery_task_id != task_id or job.state.terminal:
            return Claim(ClaimOutcome.skip, detail="unknown, superseded or finished")
        if job.deadline_at <= now:
            fail_job(session, job_id, f"deadline exceeded before the job could run "
                     f"({settings.job_deadline_seconds}s)", task_id=task_id)
            return Claim(ClaimOutcome.failed, detail="deadline")
        if job.attempts >= job.max_attempts:
            fail_job(session, job_id, f"worker lost: the job was started {job.attempts} times "
                     f"(max_attempts={job.max_attempts}) without finishing", task_id=task_id)
            return Claim(ClaimOutcome.failed, detail="attempts exhausted")
        return Claim(ClaimOutcome.busy, detail=f"running on {job.worker}")


class Heartbeat:
    """Background thread refreshing ``heartbeat_at``; flags loss of ownership."""

    def __init__(self, factory: sessionmaker[Session], job_id: str, task_id: str, interval: float) -> None:
        self.factory, self.job_id, self.task_id, self.interval = factory, job_id, task_id, interval
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{job_id}", daemon=True)

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval + 5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                with session_scope(self.factory) as session:
                    now = utcnow()
                    result = session.execute(
                        update(Job)
                        .where(Job.id == self.job_id, Job.celery_task_id == self.task_id,
                               Job.state == JobState.running)
                        .values(heartbeat_at=now)
                    )
                    if result.rowcount != 1:  # type: ignore[attr-defined]
                        self.lost.set()
                        return
            except Exception:  # noqa: BLE001 - a DB hiccup: try again next beat
                log.warning("heartbeat write failed for job %s", self.job_id, exc_info=True)


class ProgressWriter:
    """The ``progress(fraction, message)`` callback given to the pipeline.

    Writes at most every ``min_interval`` seconds (and whenever the integer percentage would
    jump by 10 or more); each write is a CAS that doubles as the cancellation check, and the
    heartbeat's loss flag is checked on every call.
    """

    def __init__(self, factory: sessionmaker[Session], job_id: str, task_id: str, min_interval: float,
                 heartbeat: Heartbeat, clock: Callable[[], float] = time.monotonic) -> None:
        self.factory, self.job_id, self.task_id = factory, job_id, task_id
        self.min_interval, self.heartbeat, self.clock = min_interval, heartbeat, clock
        self._last_write = -float("inf")
        self._last_pct = 0
        self.writes = 0

    def __call__(self, fraction: float, message: str) -> None:
        if self.heartbeat.lost.is_set():
            raise JobAborted("job no longer owned by this execution")
        pct = max(0, min(99, int(float(fraction) * 100)))
        now = self.clock()
        if now - self._last_write < self.min_interval and pct - self._last_pct < 10:
            return
        self._write(pct, message)
        self._last_write, self._last_pct = now, pct

    def _write(self, pct: int, message: str) -> None:
        with session_scope(self.factory) as session:
            result = session.execute(
                update(Job)
                .where(Job.id == self.job_id, Job.celery_task_id == self.task_id, Job.state == JobState.running,
                       Job.deadline_at > utcnow())
                .values(progress=pct, message=message[:2000], heartbeat_at=utcnow(), updated_at=utcnow())
            )
            self.writes += 1
            if result.rowcount != 1:  # type: ignore[attr-defined]
                raise JobAborted("job cancelled, reaped or past its deadline")


def flatten_metrics(metrics: dict[str, Any], prefix: str = "") -> dict[str, float | str | None]:
    out: dict[str, float | str | None] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten_metrics(value, prefix=f"{name}."))
        elif isinstance(value, bool):
            out[name] = float(value)
        elif isinstance(value, (int, float)):
            out[name] = float(value)
        elif value is None:
            out[name] = None
        elif isinstance(value, str):
            out[name] = value
        else:
            out[name] = json.dumps(value, default=str)
    return out


@dataclass
class PipelineOutput:
    artifact_dir: Path
    manifest: dict[str, Any]
    metrics: dict[str, Any]


def record_success(factory: sessionmaker[Session], job_id: str, task_id: str, output: PipelineOutput) -> bool:
    """Mark succeeded and store artifact + metrics in one transaction; False if the job was taken away."""
    sha, size = folder_digest(output.artifact_dir)
    now = utcnow()
    with session_scope(factory) as session:
        result = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.celery_task_id == task_id, Job.state == JobState.running)
            .values(state=JobState.succeeded, progress=100, message="succeeded", error=None, finished_at=now,
                    heartbeat_at=now, updated_at=now)
        )
        if result.rowcount != 1:  # type: ignore[attr-defined]
            session.rollback()
            return False
        session.add(Artifact(job_id=job_id, path=str(output.artifact_dir.resolve()), sha256=sha, size_bytes=size,
                             manifest=json.loads(json.dumps(output.manifest, default=str))))
        for key, value in sorted(flatten_metrics(output.metrics).items()):
            session.add(Metric(job_id=job_id, key=key[:255], value=value if isinstance(value, float) else None,
                               text=value if isinstance(value, str) else None))
    return True


def attempt_dir(settings: Settings, job_id: str, attempt: int) -> Path:
    return settings.artifact_dir / job_id / f"attempt-{attempt}"


Pipeline = Callable[[Job, Path, Callable[[float, str], None]], PipelineOutput]


def execute_job(factory: sessionmaker[Session], settings: Settings, job_id: str, task_id: str, worker: str,
                pipeline: Pipeline) -> Claim:
    """Claim and run one job to a recorded end state. Returns the claim outcome (for the task)."""
    claim = claim_job(factory, settings, job_id, task_id, worker)
    if claim.outcome is not ClaimOutcome.claimed:
        log.info("job %s not run by task %s: %s %s", job_id, task_id, claim.outcome.value, claim.detail)
        return claim
    out_dir = attempt_dir(settings, job_id, claim.attempt)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    with factory() as session:
        job = session.get(Job, job_id)
        assert job is not None
        session.expunge(job)
    log.info("job %s attempt %d started on %s", job_id, claim.attempt, worker)
    with Heartbeat(factory, job_id, task_id, settings.heartbeat_seconds) as beat:
        progress = ProgressWriter(factory, job_id, task_id, settings.progress_min_interval_seconds, beat)
        try:
            output = pipeline(job, out_dir, progress)
            if beat.lost.is_set():
                raise JobAborted("job no longer owned by this execution")
            if not record_success(factory, job_id, task_id, output):
                raise JobAborted("job cancelled or reaped before its result was recorded")
        except JobAborted as exc:
            log.info("job %s attempt %d stopped: %s", job_id, claim.attempt, exc)
            shutil.rmtree(out_dir, ignore_errors=True)
            return claim
        except Exception as exc:  # noqa: BLE001 - every failure is recorded with its reason
            reason = f"{type(exc).__name__}: {exc}"[:4000]
            log.warning("job %s attempt %d failed: %s", job_id, claim.attempt, reason, exc_info=True)
            with session_scope(factory) as session:
                fail_job(session, job_id, reason, expected=(JobState.running,), task_id=task_id)
            shutil.rmtree(out_dir, ignore_errors=True)
            return claim
    for stale in (settings.artifact_dir / job_id).glob("attempt-*"):
        if stale != out_dir:
            shutil.rmtree(stale, ignore_errors=True)
    log.info("job %s succeeded", job_id)
    return claim
