"""Service and worker settings (environment variables prefixed ``QAAS_``).

The only process-wide state the service keeps: everything else (engine, session factory, Celery
app) is built from a :class:`Settings` instance and passed explicitly or hung on ``app.state``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from quant.settings import QuantSettings

DEFAULT_VAR_DIR = Path("var")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="QAAS_", extra="ignore")

    database_url: str = Field(
        f"sqlite:///{DEFAULT_VAR_DIR / 'qaas.db'}",
        description="SQLAlchemy URL; SQLite under ./var is the embedded default, PostgreSQL in production",
    )
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Celery broker URL (Redis)")
    result_backend_url: str | None = Field(None, description="Celery result backend; defaults to redis_url")
    artifact_dir: Path = Field(DEFAULT_VAR_DIR / "artifacts", description="where job artifacts are written")
    model_store: Path = Field(
        default_factory=lambda: QuantSettings().model_store,
        description="local HF-format model folders (same variable and default as quant.settings)",
    )

    max_body_bytes: int = Field(1_048_576, ge=1024, description="request bodies above this are refused with 413")
    job_deadline_seconds: int = Field(6 * 3600, ge=1, description="a job not finished this long after submission fails")
    max_attempts: int = Field(3, ge=1, description="executions of one job (worker deaths included) before it fails")
    heartbeat_seconds: float = Field(10.0, gt=0, description="running jobs refresh their heartbeat this often")
    heartbeat_stale_seconds: float = Field(60.0, gt=0, description="a running job silent this long lost its worker")
    progress_min_interval_seconds: float = Field(1.0, ge=0, description="throttle for progress writes")
    reaper_interval_seconds: float = Field(30.0, gt=0, description="celery beat period of the reaper")
    broker_visibility_timeout_seconds: int = Field(
        600, ge=1, description="unacked broker messages are redelivered after this (duplicates are harmless)"
    )
    default_device: Literal["cpu", "cuda"] = Field("cpu", description="device of jobs that do not name one")
    worker_threads: int = Field(0, ge=0, description="torch threads in a worker process; 0 keeps torch's default")

    auth_enabled: bool = Field(True, description="require an API key (X-API-Key or Bearer) on /v1 routes")
    admin_token: SecretStr | None = Field(None, description="enables /v1/admin routes (X-Admin-Token header)")
    auto_migrate: bool = Field(
        True, description="run Alembic migrations to head at startup; if false, refuse to start unless at head"
    )
    log_level: str = "INFO"

    @field_validator("database_url")
    @classmethod
    def _normalise_db_url(cls, value: str) -> str:
        if value.startswith("postgres://"):
            return "postgresql+psycopg2://" + value[len("postgres://"):]
        if value.startswith("postgresql://"):
            return "postgresql+psycopg2://" + value[len("postgresql://"):]
        return value

    @property
    def backend_url(self) -> str:
        return self.result_backend_url or self.redis_url

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    def ensure_dirs(self) -> None:
        """Create the local folders the settings point at (SQLite file's folder, artifacts)."""
        self.artifact_dir.mkdir(parents=True, exist_ok=True)
        if self.is_sqlite and ":memory:" not in self.database_url:
            db_path = self.database_url.split(":///", 1)[-1]
            if db_path:
                Path(db_path).parent.mkdir(parents=True, exist_ok=True)
