"""Database layer: typed SQLAlchemy 2 models, engine/session construction, migrations."""

from service.db.models import ApiKey, Artifact, Base, Job, JobState, Metric, RegisteredModel, UserRecipe
from service.db.session import make_engine, make_session_factory

__all__ = [
    "ApiKey",
    "Artifact",
    "Base",
    "Job",
    "JobState",
    "Metric",
    "RegisteredModel",
    "UserRecipe",
    "make_engine",
    "make_session_factory",
]
