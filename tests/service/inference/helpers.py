"""Helpers shared by the inference and dashboard tests: a test app on SQLite with seeded API keys,
jobs and artifacts, and a real uvicorn server on a free loopback port."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI

from service.db.models import ApiKey, Artifact, Job, JobState, Metric
from service.db.types import utcnow
from tests.conftest import VOCAB, make_calibration, make_tiny_bert, make_tiny_llama, make_tiny_opt

PAD, EOS, UNK = 0, 1, 2


# ------------------------------------------------------------------------------------ models
def make_char_tokenizer():
    """<pad>=0, <eos>=1, <unk>=2, then one token per printable ASCII character (vocab = 128)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD, "<eos>": EOS, "<unk>": UNK}
    for code in range(32, 32 + VOCAB - len(vocab)):
        vocab[chr(code)] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


RTN_RECIPE: dict[str, Any] = {
    "method": {"name": "rtn"},
    "weight": {"bits": 4, "granularity": "per_group", "group_size": 32},
    "activation": {"bits": 8},
}


def quantize_rtn(model: torch.nn.Module, recipe: dict[str, Any] | None = None) -> torch.nn.Module:
    from quant.methods.base import get_method
    from quant.recipes.schema import Recipe

    return get_method("rtn").calibrate(model, make_calibration(), Recipe.model_validate(recipe or RTN_RECIPE))


def _no_eos(model: torch.nn.Module) -> torch.nn.Module:
    model.generation_config.eos_token_id = None  # random weights: let max_tokens decide the length
    model.config.eos_token_id = None
    return model


def quantized_llama(seed: int = 0) -> torch.nn.Module:
    return quantize_rtn(_no_eos(make_tiny_llama(seed=seed)))


def quantized_llama_with(recipe: dict[str, Any], seed: int = 0) -> torch.nn.Module:
    return quantize_rtn(_no_eos(make_tiny_llama(seed=seed)), recipe)


def quantized_opt(seed: int = 0) -> torch.nn.Module:
    return quantize_rtn(_no_eos(make_tiny_opt(seed=seed)))


def quantized_bert(seed: int = 0) -> torch.nn.Module:
    return quantize_rtn(make_tiny_bert(seed=seed))


BUILDERS = {"llama": quantized_llama, "opt": quantized_opt, "bert": quantized_bert}


# ------------------------------------------------------------------------------------ app
class RecordingDispatcher:
    """Stands in for Celery: records what would be enqueued."""

    def __init__(self) -> None:
        self.enqueued: list[tuple[str, str, str]] = []
        self.revoked: list[str] = []

    def enqueue(self, job_id: str, task_id: str, device: str) -> None:
        self.enqueued.append((job_id, task_id, device))

    def revoke(self, task_id: str) -> None:
        self.revoked.append(task_id)


@dataclass
class SeededApp:
    app: FastAPI
    keys: dict[str, str] = field(default_factory=dict)  # owner -> plaintext key
    key_ids: dict[str, int] = field(default_factory=dict)
    jobs: dict[str, str] = field(default_factory=dict)  # label -> job id
    models: dict[str, torch.nn.Module] = field(default_factory=dict)  # artifact kind -> the saved model
    client: Any = None  # a TestClient while the app runs

    def headers(self, owner: str) -> dict[str, str]:
        return {"X-API-Key": self.keys[owner]}

    @property
    def factory(self):
        return self.app.state.session_factory


def make_app(tmp_path: Path, inference: dict[str, Any] | None = None) -> SeededApp:
    from service.app import create_app
    from service.db.migrate import ensure_schema
    from service.db.session import make_engine
    from service.inference.settings import InferenceSettings
    from service.settings import Settings

    tmp_path.mkdir(parents=True, exist_ok=True)
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'qaas.db'}",
        artifact_dir=tmp_path / "artifacts",
        model_store=tmp_path / "model_store",
        auth_enabled=True,
    )
    engine = make_engine(settings.database_url)
    ensure_schema(engine, True)
    app = create_app(settings, engine=engine, dispatcher=RecordingDispatcher())
    app.state.inference_settings = InferenceSettings(device="cpu", **(inference or {}))
    return SeededApp(app=app)


def add_key(seeded: SeededApp, owner: str) -> str:
    from service.security import create_api_key

    with seeded.factory() as session:
        new = create_api_key(session, owner)
        session.commit()
        seeded.keys[owner] = new.plaintext
        seeded.key_ids[owner] = new.record.id
    return new.plaintext


def add_job(
    seeded: SeededApp,
    owner: str,
    label: str,
    model_id: str,
    state: JobState,
    progress: int = 0,
    recipe: dict[str, Any] | None = None,
    recipe_name: str | None = None,
    artifact: Path | None = None,
    metrics: dict[str, float] | None = None,
    message: str | None = None,
) -> str:
    now = utcnow()
    with seeded.factory() as session:
        job = Job(
            api_key_id=seeded.key_ids[owner],
            model_id=model_id,
            recipe=recipe or RTN_RECIPE,
            recipe_name=recipe_name,
            device="cpu",
            state=state,
            progress=progress,
            message=message,
            deadline_at=now + timedelta(hours=6),
            started_at=None if state == JobState.queued else now,
            finished_at=now if state.terminal else None,
        )
        session.add(job)
        session.flush()
        if artifact is not None:
            manifest = artifact_manifest(artifact) if (artifact / "manifest.json").is_file() else {}
            session.add(Artifact(job_id=job.id, path=str(artifact), sha256=manifest.get("weights_sha256", "0" * 64),
                                 size_bytes=int(manifest.get("size_bytes", 1)), manifest=manifest))
        for key, value in (metrics or {}).items():
            session.add(Metric(job_id=job.id, key=key, value=value))
        session.commit()
        seeded.jobs[label] = job.id
        return job.id


def key_record(seeded: SeededApp, owner: str) -> ApiKey:
    with seeded.factory() as session:
        return session.get(ApiKey, seeded.key_ids[owner])


# ------------------------------------------------------------------------------------ server
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LiveServer:
    """uvicorn serving ``app`` on a free loopback port in a background thread."""

    def __init__(self, app: FastAPI) -> None:
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


# ------------------------------------------------------------------------------------ artifacts
def save_model_artifact(kind: str, folder: Path, seed: int = 0, base_model_id: str | None = None) -> torch.nn.Module:
    """Quantize a tiny random ``kind`` model with RTN and save it with the char tokenizer as a real
    artifact (quant.artifacts.save_artifact); returns the in-memory quantized model for reference."""
    from quant.artifacts import ArtifactManifest, save_artifact
    from quant.recipes.schema import Recipe

    model = BUILDERS[kind](seed)
    manifest = ArtifactManifest(base_model_id=base_model_id or f"qaas/tiny-{kind}", recipe=Recipe.model_validate(RTN_RECIPE))
    save_artifact(model, folder, manifest, tokenizer=make_char_tokenizer())
    return model


def artifact_manifest(folder: Path) -> dict[str, Any]:
    """The manifest as the jobs API stores it on the Artifact row."""
    from quant.artifacts import read_manifest

    return read_manifest(folder).model_dump(mode="json")
