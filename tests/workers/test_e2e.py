"""End to end: the real API (TestClient over create_app), a real ``celery -A workers.app worker``
process, Redis and PostgreSQL, quantizing a tiny random LLaMA saved into a temporary model store.

Mechanics only: the model is random, so the metrics' values are not quality claims.
"""

from __future__ import annotations

import io
import os
import signal
import tarfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings
from service.testing import WorkerProcess, wait_for

pytestmark = pytest.mark.e2e

MODEL_ID = "tiny/llama"
SMALL = {"num_samples": 4, "seq_len": 32, "batch_size": 2}
FAST_RECIPE: dict[str, Any] = {
    "name": "e2e-rtn",
    "method": {"name": "rtn"},
    "weight": {"bits": 4, "granularity": "per_group", "group_size": 32},
    "activation": {"bits": 8},
    "calibration": SMALL,
    "evaluation": {"num_samples": 4, "seq_len": 32},
}
# a few seconds of GPTQ: long enough to be cancelled or killed while running
SLOW_RECIPE: dict[str, Any] = {
    "name": "e2e-gptq",
    "method": {"name": "gptq"},
    "weight": {"bits": 4, "algorithm": "gptq"},
    "activation": {"bits": 8},
    "calibration": {"num_samples": 8, "seq_len": 32, "batch_size": 4},
    "evaluation": {"num_samples": 4, "seq_len": 32},
}


def _char_tokenizer():  # type: ignore[no-untyped-def]
    """A 128-token character tokenizer matching the tiny models' vocabulary (saved with the model)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for code in range(32, 32 + 128 - len(vocab)):
        vocab[chr(code)] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


@pytest.fixture(scope="module")
def model_store(tmp_path_factory: pytest.TempPathFactory, tiny_factories) -> Path:  # type: ignore[no-untyped-def]
    store = tmp_path_factory.mktemp("e2e_store")
    folder = store / "tiny" / "llama"
    tiny_factories.make_tiny_llama().save_pretrained(folder)
    _char_tokenizer().save_pretrained(folder)
    return store


@pytest.fixture(scope="module")
def stack_settings(worker_settings: Settings, model_store: Path) -> Settings:
    return worker_settings.model_copy(update={"model_store": model_store})


def _env(settings: Settings) -> dict[str, str]:
    return {
        "QAAS_DATABASE_URL": settings.database_url,
        "QAAS_REDIS_URL": settings.redis_url,
        "QAAS_ARTIFACT_DIR": str(settings.artifact_dir),
        "QAAS_MODEL_STORE": str(settings.model_store),
        "QAAS_HEARTBEAT_SECONDS": str(settings.heartbeat_seconds),
        "QAAS_HEARTBEAT_STALE_SECONDS": str(settings.heartbeat_stale_seconds),
        "QAAS_PROGRESS_MIN_INTERVAL_SECONDS": "0.2",
        "QAAS_WORKER_THREADS": "1",
        "QAAS_REAPER_INTERVAL_SECONDS": "1",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
    }


@pytest.fixture(scope="module")
def api(stack_settings: Settings, worker_redis) -> Iterator[tuple[TestClient, dict[str, str]]]:  # type: ignore[no-untyped-def]
    worker_redis.delete("cpu", "gpu")
    with TestClient(create_app(stack_settings)) as client:
        r = client.post("/v1/admin/api-keys", json={"owner": "e2e"},
                        headers={"X-Admin-Token": stack_settings.admin_token.get_secret_value()})
        assert r.status_code == 201
        yield client, {"X-API-Key": r.json()["api_key"]}
    # leave Redis as found: queues, messages of killed workers, task results
    worker_redis.delete("cpu", "gpu", "unacked", "unacked_index", "unacked_mutex")
    for key in worker_redis.scan_iter("celery-task-meta-*"):
        worker_redis.delete(key)


def _start(settings: Settings, folder: Path, name: str, beat: bool = False) -> WorkerProcess:
    return WorkerProcess(_env(settings), queues="cpu", concurrency=1, log_path=folder / f"{name}.log",
                         name=f"{name}-{uuid.uuid4().hex[:6]}@%h", beat=beat)


@pytest.fixture(scope="module")
def shared_worker(stack_settings: Settings, api, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """One worker (prefork, one pool process) for the tests that keep their worker alive."""
    worker = _start(stack_settings, tmp_path_factory.mktemp("worker_logs"), "shared")
    yield worker
    worker.stop()


@pytest.fixture
def start_worker(stack_settings: Settings, tmp_path: Path):  # type: ignore[no-untyped-def]
    """Private workers, for the test that kills a whole worker. It runs first in this module, before
    the shared worker exists (which would otherwise compete for its job and fail its assertions)."""
    started: list[WorkerProcess] = []

    def start(name: str, beat: bool = False) -> WorkerProcess:
        started.append(_start(stack_settings, tmp_path, name, beat))
        return started[-1]

    yield start
    for w in started:
        w.stop()


def _submit(client: TestClient, auth: dict[str, str], recipe: dict[str, Any]) -> str:
    r = client.post("/v1/jobs", json={"model_id": MODEL_ID, "recipe": recipe}, headers=auth)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def _job(client: TestClient, auth: dict[str, str], job_id: str) -> dict[str, Any]:
    return client.get(f"/v1/jobs/{job_id}", headers=auth).json()


def _wait_terminal(client: TestClient, auth: dict[str, str], job_id: str, worker: WorkerProcess,
                   timeout: float = 240) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        assert worker.alive(), worker.log_tail()
        job = _job(client, auth, job_id)
        return job if job["state"] in ("succeeded", "failed", "cancelled") else None

    try:
        return wait_for(done, timeout=timeout, interval=0.5, what=f"job {job_id}")
    except TimeoutError:
        raise AssertionError(f"{_job(client, auth, job_id)}\n{worker.log_tail()}") from None


def _running_with_progress(client: TestClient, auth: dict[str, str], job_id: str) -> dict[str, Any] | None:
    job = _job(client, auth, job_id)
    assert job["state"] in ("queued", "running"), job
    return job if job["state"] == "running" and job["progress"] > 0 else None


def test_sigkill_of_the_whole_worker_requeues_and_finishes(api, start_worker, stack_settings) -> None:  # type: ignore[no-untyped-def]
    client, auth = api
    first = start_worker("doomed")
    job_id = _submit(client, auth, SLOW_RECIPE)
    wait_for(lambda: _running_with_progress(client, auth, job_id), timeout=180, interval=0.1,
             what="the job to be running")
    first.kill(signal.SIGKILL)  # main process and pool child, mid-job
    first.proc.wait(10)
    assert _job(client, auth, job_id)["state"] == "running"  # nobody has noticed yet

    second = start_worker("rescuer", beat=True)  # its embedded beat runs the reaper every second
    job = _wait_terminal(client, auth, job_id, second)
    assert job["state"] == "succeeded", (job["error"], second.log_tail())
    assert job["attempts"] == 2
    assert client.get(f"/v1/jobs/{job_id}/artifact", headers=auth).status_code == 200


def test_job_runs_to_success_with_metrics_and_artifact(api, shared_worker) -> None:  # type: ignore[no-untyped-def]
    client, auth = api
    worker = shared_worker
    job_id = _submit(client, auth, FAST_RECIPE)
    job = _wait_terminal(client, auth, job_id, worker)
    assert job["state"] == "succeeded", (job["error"], worker.log_tail())
    assert job["progress"] == 100 and job["attempts"] == 1 and job["error"] is None

    metrics = client.get(f"/v1/jobs/{job_id}/metrics", headers=auth).json()["metrics"]
    assert metrics and all(isinstance(v, (float, str)) or v is None for v in metrics.values())
    numeric = [v for v in metrics.values() if isinstance(v, float)]
    assert numeric and all(v == v for v in numeric)  # no NaN

    r = client.get(f"/v1/jobs/{job_id}/artifact", headers=auth)
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-tar"
    assert int(r.headers["content-length"]) == len(r.content)
    with tarfile.open(fileobj=io.BytesIO(r.content)) as tar:
        names = {Path(n).name for n in tar.getnames()}
    assert {"model.safetensors", "manifest.json"} <= names
    assert r.headers["x-artifact-sha256"] == job["artifact"]["sha256"]


def test_cancel_while_running(api, shared_worker) -> None:  # type: ignore[no-untyped-def]
    client, auth = api
    worker = shared_worker
    job_id = _submit(client, auth, SLOW_RECIPE)
    wait_for(lambda: _job(client, auth, job_id)["state"] == "running", timeout=120, what="running")
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=auth).json()["state"] == "cancelled"
    time.sleep(3)  # the worker notices at its next progress write and stops without overwriting
    job = _job(client, auth, job_id)
    assert job["state"] == "cancelled" and job["artifact"] is None
    assert worker.alive()


def test_sigkill_of_the_pool_process_is_redelivered(api, shared_worker) -> None:  # type: ignore[no-untyped-def]
    client, auth = api
    worker = shared_worker
    job_id = _submit(client, auth, SLOW_RECIPE)
    job = wait_for(lambda: _running_with_progress(client, auth, job_id), timeout=180, interval=0.1,
                   what="the job to be running")
    child_pid = int(job_worker(api, job_id).rsplit(":", 1)[1])
    assert child_pid != worker.pid
    os.kill(child_pid, signal.SIGKILL)
    job = _wait_terminal(client, auth, job_id, worker)
    assert job["state"] == "succeeded", (job["error"], worker.log_tail())
    assert job["attempts"] == 2


def job_worker(api, job_id: str) -> str:  # type: ignore[no-untyped-def]
    """The ``host:pid`` of the process running a job (not part of the public API)."""
    client, _ = api
    from service.db.models import Job

    with client.app.state.session_factory() as s:
        job = s.get(Job, job_id)
        assert job is not None and job.worker
        return job.worker
