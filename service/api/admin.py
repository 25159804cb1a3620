"""/v1/admin: key creation and a reaper trigger, enabled only when QAAS_ADMIN_TOKEN is set."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from service.api.deps import DispatcherDep, SessionDep, SettingsDep, require_admin
from service.api.schemas import ApiKeyCreate, ApiKeyCreated, ReapOut
from service.errors import ERROR_RESPONSES
from service.jobs import reap
from service.security import create_api_key

router = APIRouter(prefix="/v1/admin", tags=["admin"], dependencies=[Depends(require_admin)],
                   responses=ERROR_RESPONSES)


@router.post("/api-keys", response_model=ApiKeyCreated, status_code=201, summary="Create an API key (shown once)")
def new_key(body: ApiKeyCreate, session: SessionDep) -> ApiKeyCreated:
    created = create_api_key(session, body.owner)
    session.commit()
    return ApiKeyCreated(key_id=created.record.key_id, owner=created.record.owner, api_key=created.plaintext)


@router.post("/reap", response_model=ReapOut, summary="Run the reaper now (expired and orphaned jobs)")
def run_reaper(session: SessionDep, settings: SettingsDep, dispatcher: DispatcherDep) -> ReapOut:
    return ReapOut(**reap(session, settings, dispatcher).as_dict())
