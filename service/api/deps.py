"""Request dependencies: settings, a DB session per request, the dispatcher, the caller's API key."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Header, Request
from sqlalchemy.orm import Session, sessionmaker

from service.db.models import ApiKey
from service.dispatch import Dispatcher
from service.errors import ApiError
from service.security import anonymous_key, verify_api_key
from service.settings import Settings


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_session(request: Request) -> Iterator[Session]:
    factory: sessionmaker[Session] = request.app.state.session_factory
    session = factory()
    try:
        yield session
    finally:
        session.close()


def get_dispatcher(request: Request) -> Dispatcher:
    return request.app.state.dispatcher


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(get_session)]
DispatcherDep = Annotated[Dispatcher, Depends(get_dispatcher)]


def _presented_key(x_api_key: str | None, authorization: str | None) -> str | None:
    if x_api_key:
        return x_api_key
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    return None


def get_api_key(
    settings: SettingsDep,
    session: SessionDep,
    x_api_key: Annotated[str | None, Header(alias="X-API-Key", description="API key (or use Authorization: Bearer)")] = None,
    authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> ApiKey:
    if not settings.auth_enabled:
        key = anonymous_key(session)
        session.commit()
        return key
    presented = _presented_key(x_api_key, authorization)
    if presented is None:
        raise ApiError(401, "missing API key: send X-API-Key or Authorization: Bearer <key>")
    record = verify_api_key(session, presented)
    if record is None:
        raise ApiError(401, "invalid API key")
    session.commit()
    return record


ApiKeyDep = Annotated[ApiKey, Depends(get_api_key)]


def require_admin(
    settings: SettingsDep,
    x_admin_token: Annotated[str | None, Header(alias="X-Admin-Token")] = None,
) -> None:
    import hmac

    if settings.admin_token is None:
        raise ApiError(404, "admin API disabled (set QAAS_ADMIN_TOKEN)")
    if x_admin_token is None or not hmac.compare_digest(x_admin_token, settings.admin_token.get_secret_value()):
        raise ApiError(401, "invalid admin token")
