"""Which job's artifact a request may serve: resolution of ``model`` (job id or served-model name)
scoped to the calling API key.

A served-model name is ``<base model id>:<recipe name or method name>``; when several of the key's
jobs share a name, the most recently finished successful one is served. Another key's job is
indistinguishable from a missing one (404).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Literal

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from service.db.models import Job, JobState


class UnknownModel(LookupError):
    def __init__(self, name: str) -> None:
        super().__init__(f"model {name!r} not found")
        self.name = name


class JobNotReady(RuntimeError):
    def __init__(self, job_id: str, state: str) -> None:
        super().__init__(f"job {job_id} is {state}; only succeeded jobs can be served")
        self.job_id = job_id
        self.state = state


@dataclass(frozen=True)
class ServableJob:
    job_id: str
    served_name: str
    base_model: str
    artifact_path: Path
    created: datetime
    kind: Literal["causal", "encoder"] | None  # from the artifact manifest, when it says


_KINDS: dict[str, Literal["causal", "encoder"]] = {"causal_lm": "causal", "encoder": "encoder"}


def served_name(job: Job) -> str:
    label = job.recipe_name or str((job.recipe or {}).get("method", {}).get("name", "model"))
    return f"{job.model_id}:{label}"


def _servable(job: Job) -> ServableJob:
    if job.state != JobState.succeeded:
        raise JobNotReady(job.id, job.state.value)
    if job.artifact is None:
        raise JobNotReady(job.id, "succeeded without an artifact")
    return ServableJob(
        job_id=job.id,
        served_name=served_name(job),
        base_model=job.model_id,
        artifact_path=Path(job.artifact.path),
        created=job.finished_at or job.created_at,
        kind=_KINDS.get(str((job.artifact.manifest or {}).get("model_kind", ""))),
    )


def resolve_job(factory: sessionmaker[Session], api_key_id: int, name: str) -> ServableJob:
    """The servable job ``name`` names for this key; UnknownModel (404) or JobNotReady (409)."""
    with factory() as session:
        job = session.get(Job, name)
        if job is not None and job.api_key_id == api_key_id:
            return _servable(job)
        base_model, sep, _ = name.rpartition(":")
        if not sep:
            raise UnknownModel(name)
        query = (
            select(Job)
            .where(Job.api_key_id == api_key_id, Job.model_id == base_model)
            .order_by(Job.created_at.desc())
        )
        candidates = [j for j in session.scalars(query) if served_name(j) == name]
        if not candidates:
            raise UnknownModel(name)
        done = [j for j in candidates if j.state == JobState.succeeded and j.artifact is not None]
        if not done:
            return _servable(candidates[0])  # raises JobNotReady with the newest job's state
        return _servable(max(done, key=lambda j: j.finished_at or j.created_at))


def servable_jobs(factory: sessionmaker[Session], api_key_id: int) -> list[ServableJob]:
    with factory() as session:
        jobs = session.scalars(
            select(Job)
            .where(Job.api_key_id == api_key_id, Job.state == JobState.succeeded)
            .order_by(Job.created_at.desc())
        )
        return [_servable(j) for j in jobs if j.artifact is not None]
