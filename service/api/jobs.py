"""/v1/jobs: submit, list, inspect, cancel, retry; metrics and artifact download.

Ownership: each API key sees only its own jobs. A job that exists but belongs to another key
answers 404 exactly like a missing one, so job IDs cannot be probed.
"""

from __future__ import annotations

import base64
import json
from datetime import datetime
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import StreamingResponse
from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from service.api.deps import ApiKeyDep, DispatcherDep, SessionDep, SettingsDep
from service.api.models import ensure_registered
from service.api.recipes import parse_recipe, resolve_named_recipe
from service.api.schemas import ArtifactOut, JobCreate, JobOut, JobPage, MetricsOut
from service.archive import iter_tar, tar_size
from service.db.models import ApiKey, Job, JobState
from service.dispatch import EnqueueFailed
from service.errors import ERROR_RESPONSES, ApiError, FieldError
from service.jobs import IdempotencyConflict, TransitionRefused, cancel_job, create_job, retry_job

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=ERROR_RESPONSES)


def to_out(job: Job, request: Request) -> JobOut:
    artifact = None
    if job.artifact is not None:
        artifact = ArtifactOut(sha256=job.artifact.sha256, size_bytes=job.artifact.size_bytes,
                               manifest=job.artifact.manifest,
                               download_url=str(request.url_for("download_artifact", job_id=job.id)))
    return JobOut(
        id=job.id, model_id=job.model_id, recipe_name=job.recipe_name, recipe=job.recipe, device=job.device,
        state=job.state, progress=job.progress, message=job.message, error=job.error, attempts=job.attempts,
        max_attempts=job.max_attempts, idempotency_key=job.idempotency_key, created_at=job.created_at,
        updated_at=job.updated_at, started_at=job.started_at, finished_at=job.finished_at,
        deadline_at=job.deadline_at, artifact=artifact,
    )


def owned_job(session: Session, key: ApiKey, job_id: str) -> Job:
    job = session.get(Job, job_id)
    if job is None or job.api_key_id != key.id:
        raise ApiError(404, f"job {job_id} not found")
    return job


@router.post("", response_model=JobOut, status_code=201,
             summary="Submit a quantization job (a repeated Idempotency-Key returns the first job with 200)")
def submit_job(
    body: JobCreate,
    request: Request,
    response: Response,
    key: ApiKeyDep,
    session: SessionDep,
    settings: SettingsDep,
    dispatcher: DispatcherDep,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", max_length=255)] = None,
) -> JobOut:
    if body.recipe is not None:
        recipe, recipe_name = parse_recipe(body.recipe, "recipe"), body.recipe.get("name")
    else:
        assert body.preset is not None
        recipe, recipe_name = resolve_named_recipe(session, key.id, body.preset, "preset"), body.preset
    ensure_registered(session, settings, body.model_id, key)
    try:
        result = create_job(session, settings, dispatcher, key.id, body.model_id, recipe.to_dict(), recipe_name,
                            body.device or settings.default_device, idempotency_key)
    except IdempotencyConflict as exc:
        raise ApiError(409, f"Idempotency-Key already used for job {exc.job.id} with a different request",
                       code="idempotency_conflict") from None
    except EnqueueFailed:
        raise ApiError(503, "job queue unavailable; the job was recorded as failed") from None
    response.status_code = 201 if result.created else 200
    if result.created:
        response.headers["Location"] = str(request.url_for("get_job", job_id=result.job.id))
    return to_out(result.job, request)


def _encode_cursor(job: Job) -> str:
    raw = json.dumps([job.created_at.isoformat(), job.id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, job_id = json.loads(raw)
        return datetime.fromisoformat(created), str(job_id)
    except (ValueError, TypeError):
        raise ApiError(422, "invalid cursor", details=[FieldError(field="cursor", message="malformed cursor",
                                                                  type="value_error")]) from None


@router.get("", response_model=JobPage, summary="Your jobs, newest first (keyset pagination)")
def list_jobs(
    request: Request,
    key: ApiKeyDep,
    session: SessionDep,
    state: JobState | None = None,
    model_id: str | None = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: str | None = None,
) -> JobPage:
    stmt = select(Job).where(Job.api_key_id == key.id)
    if state is not None:
        stmt = stmt.where(Job.state == state)
    if model_id is not None:
        stmt = stmt.where(Job.model_id == model_id)
    if cursor is not None:
        created, job_id = _decode_cursor(cursor)
        stmt = stmt.where(or_(Job.created_at < created, and_(Job.created_at == created, Job.id < job_id)))
    rows = list(session.scalars(stmt.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)))
    next_cursor = _encode_cursor(rows[limit - 1]) if len(rows) > limit else None
    return JobPage(items=[to_out(j, request) for j in rows[:limit]], next_cursor=next_cursor)


@router.get("/{job_id}", response_model=JobOut, summary="One job")
def get_job(job_id: str, request: Request, key: ApiKeyDep, session: SessionDep) -> JobOut:
    return to_out(owned_job(session, key, job_id), request)


@router.post("/{job_id}/cancel", response_model=JobOut, summary="Cancel a queued or running job")
def cancel(job_id: str, request: Request, key: ApiKeyDep, session: SessionDep, dispatcher: DispatcherDep) -> JobOut:
    job = owned_job(session, key, job_id)
    try:
        return to_out(cancel_job(session, dispatcher, job), request)
    except TransitionRefused as exc:
        raise ApiError(409, str(exc), code="invalid_state") from None


@router.post("/{job_id}/retry", response_model=JobOut, summary="Run a failed or cancelled job again")
def retry(job_id: str, request: Request, key: ApiKeyDep, session: SessionDep, settings: SettingsDep,
          dispatcher: DispatcherDep) -> JobOut:
    job = owned_job(session, key, job_id)
    try:
        return to_out(retry_job(session, settings, dispatcher, job), request)
    except TransitionRefused as exc:
        raise ApiError(409, str(exc), code="invalid_state") from None
    except EnqueueFailed:
        raise ApiError(503, "job queue unavailable; the job was recorded as failed") from None


@router.get("/{job_id}/metrics", response_model=MetricsOut, summary="Quality and timing metrics of a job")
def metrics(job_id: str, key: ApiKeyDep, session: SessionDep) -> MetricsOut:
    job = owned_job(session, key, job_id)
    return MetricsOut(job_id=job.id, metrics={m.key: (m.value if m.text is None else m.text) for m in job.metrics})


@router.get("/{job_id}/artifact", name="download_artifact", summary="Download the artifact folder as a tar stream",
            response_class=StreamingResponse,
            responses={200: {"content": {"application/x-tar": {}}, "description": "tar of the artifact folder"}})
def download_artifact(job_id: str, key: ApiKeyDep, session: SessionDep) -> StreamingResponse:
    job = owned_job(session, key, job_id)
    if job.state != JobState.succeeded or job.artifact is None:
        raise ApiError(409, f"job {job_id} has no artifact (state {job.state.value})", code="no_artifact")
    folder = Path(job.artifact.path)
    if not folder.is_dir():
        raise ApiError(404, f"artifact files of job {job_id} are gone", code="artifact_missing")
    name = f"qaas-{job.id}"
    return StreamingResponse(
        iter_tar(folder, name),
        media_type="application/x-tar",
        headers={"Content-Disposition": f'attachment; filename="{name}.tar"',
                 "Content-Length": str(tar_size(folder, name)),
                 "X-Artifact-SHA256": job.artifact.sha256},
    )
