"""/v1/models: register model IDs resolved offline through the model store."""

from __future__ import annotations

import json
from pathlib import Path

from fastapi import APIRouter, Response
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.api.deps import ApiKeyDep, SessionDep, SettingsDep
from service.api.schemas import ModelList, ModelOut, ModelRegister
from service.db.models import ApiKey, RegisteredModel
from service.errors import ERROR_RESPONSES, ApiError
from service.settings import Settings

router = APIRouter(prefix="/v1/models", tags=["models"], responses=ERROR_RESPONSES)


def _kind(path: Path | None) -> str:
    if path is None:
        return "unknown"
    from transformers import AutoConfig

    from quant.models.store import model_kind

    try:
        return model_kind(AutoConfig.from_pretrained(str(path), local_files_only=True))
    except (OSError, ValueError, KeyError):
        model_type = json.loads((path / "config.json").read_text()).get("model_type", "unknown")
        return f"unknown:{model_type}"


def ensure_registered(session: Session, settings: Settings, model_id: str, key: ApiKey | None) -> tuple[RegisteredModel, bool]:
    """The registry row for ``model_id``, resolving and inserting it on first use; 404 if unknown."""
    existing = session.scalar(select(RegisteredModel).where(RegisteredModel.model_id == model_id))
    if existing is not None:
        return existing, False
    from quant.models.store import ModelNotFound, resolve_model

    try:
        resolved = resolve_model(model_id, store=settings.model_store, allow_hub=False)
    except ModelNotFound as exc:
        raise ApiError(404, str(exc), code="model_not_found") from None
    row = RegisteredModel(model_id=model_id, resolved_path=str(resolved.path), kind=_kind(resolved.path),
                          registered_by=key.id if key is not None else None)
    session.add(row)
    try:
        session.commit()
    except IntegrityError:  # registered concurrently
        session.rollback()
        row = session.scalars(select(RegisteredModel).where(RegisteredModel.model_id == model_id)).one()
        return row, False
    return row, True


@router.post("", response_model=ModelOut, status_code=201, summary="Register a model ID (200 if already registered)")
def register_model(body: ModelRegister, key: ApiKeyDep, session: SessionDep, settings: SettingsDep,
                   response: Response) -> RegisteredModel:
    row, created = ensure_registered(session, settings, body.model_id, key)
    response.status_code = 201 if created else 200
    return row


@router.get("", response_model=ModelList, summary="Registered models and models available offline")
def list_models(key: ApiKeyDep, session: SessionDep, settings: SettingsDep) -> ModelList:
    from quant.models.store import list_local_models

    rows = session.scalars(select(RegisteredModel).order_by(RegisteredModel.model_id)).all()
    available = sorted({m.model_id for m in list_local_models(settings.model_store)})
    return ModelList(items=[ModelOut.model_validate(r) for r in rows], available=available)
