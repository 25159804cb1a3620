"""API keys: ``qaas_<key_id>_<secret>``; only a salted SHA-256 of the secret is stored.

Keys carry 256 bits of randomness, so a salted fast hash is adequate (no password stretching
needed); comparison is constant-time. The full key is shown exactly once, at creation.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.db.models import ApiKey
from service.db.types import utcnow

KEY_PREFIX = "qaas"
_KEY_RE = re.compile(rf"^{KEY_PREFIX}_([0-9a-f]{{16}})_([A-Za-z0-9_-]{{43}})$")
#: matches anything that looks like one of our keys, for log redaction
KEY_PATTERN = re.compile(rf"{KEY_PREFIX}_[0-9a-f]{{16}}_[A-Za-z0-9_-]{{20,}}")
ANONYMOUS_OWNER = "anonymous"
ANONYMOUS_KEY_ID = "0" * 16
LAST_USED_RESOLUTION_S = 60


@dataclass(frozen=True)
class NewKey:
    record: ApiKey
    plaintext: str


def _hash(salt: str, secret: str) -> str:
    return hashlib.sha256(f"{salt}:{secret}".encode()).hexdigest()


def create_api_key(session: Session, owner: str) -> NewKey:
    """Insert a key for ``owner``; the returned plaintext is never stored."""
    key_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    salt = secrets.token_hex(16)
    record = ApiKey(key_id=key_id, salt=salt, secret_hash=_hash(salt, secret), owner=owner, active=True)
    session.add(record)
    session.flush()
    return NewKey(record=record, plaintext=f"{KEY_PREFIX}_{key_id}_{secret}")


def verify_api_key(session: Session, presented: str) -> ApiKey | None:
    match = _KEY_RE.match(presented.strip())
    if not match:
        return None
    key_id, secret = match.groups()
    record = session.scalar(select(ApiKey).where(ApiKey.key_id == key_id))
    if record is None or not record.active:
        return None
    if not hmac.compare_digest(record.secret_hash, _hash(record.salt, secret)):
        return None
    now = utcnow()
    if record.last_used_at is None or (now - record.last_used_at).total_seconds() > LAST_USED_RESOLUTION_S:
        record.last_used_at = now  # written at most once a minute per key, not on every request
    return record


def anonymous_key(session: Session) -> ApiKey:
    """The single owner every request acts as when auth is disabled (``QAAS_AUTH_ENABLED=false``)."""
    record = session.scalar(select(ApiKey).where(ApiKey.key_id == ANONYMOUS_KEY_ID))
    if record is None:
        record = ApiKey(key_id=ANONYMOUS_KEY_ID, salt="-", secret_hash="-", owner=ANONYMOUS_OWNER, active=False)
        session.add(record)
        session.flush()
    return record


def redact(text: str) -> str:
    return KEY_PATTERN.sub(f"{KEY_PREFIX}_***", text)
