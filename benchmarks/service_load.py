"""Load test of the real API on loopback: job submission / status under 50 concurrent clients, and
completions through the batching engine vs unbatched (max_batch_size=1) on a small quantized model.

    python -m benchmarks.service_load                     # defaults: 50 clients, bounded counts and time
    python -m benchmarks.service_load --database postgresql+psycopg2://postgres@127.0.0.1:5432/postgres

What runs: ``uvicorn --factory service.app:create_app`` as a subprocess on a free loopback port, with
its own SQLite file (or a throwaway PostgreSQL database) and the real Celery dispatcher (Redis at
``--redis-url``; no worker consumes, so submitted jobs stay queued: the submit figure is API + DB +
broker enqueue). The inference model is a small LLaMA-shaped model (RANDOM weights: speed only)
quantized with RTN W4A8 (g64) and saved with quant.artifacts; its succeeded job row is written into
the database directly. The batched and unbatched inference runs use two fresh server processes that
differ only in ``QAAS_INFERENCE_MAX_BATCH_SIZE``. Clients and server share the same machine.

Every phase is bounded by a request count and ``--max-seconds``. The script prints a table, writes
JSON under ``--out`` and appends the table, with ``--machine``, to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator

import httpx

REPO = Path(__file__).resolve().parents[1]
MODEL_ID = "bench/tiny-llama"
RECIPE: dict[str, Any] = {
    "method": {"name": "rtn"},
    "weight": {"bits": 4, "granularity": "per_group", "group_size": 64},
    "activation": {"bits": 8},
    "calibration": {"num_samples": 8, "seq_len": 64},
    "evaluation": {"num_samples": 4, "seq_len": 64},
}
PROMPT_WORDS = "quantization rotates outliers before rounding weights to four bits while activations stay eight".split()


# ------------------------------------------------------------------------------------ setup
def char_tokenizer(vocab_size: int):
    """A character-level fast tokenizer (<pad>, <eos>, <unk>, then printable ASCII)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for code in range(32, 32 + vocab_size - len(vocab)):
        vocab[chr(code)] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def build_model_store(store: Path, hidden: int, layers: int) -> Path:
    """A small random LLaMA in HF format in the model store (what job submissions name)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 64),
        vocab_size=128,
        max_position_embeddings=512,
        eos_token_id=None,
        bos_token_id=None,
        pad_token_id=0,
    )
    model = LlamaForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = None
    folder = store / MODEL_ID
    model.save_pretrained(folder)
    char_tokenizer(128).save_pretrained(str(folder))
    return folder


def build_artifact(model_folder: Path, artifact: Path) -> dict[str, Any]:
    """Quantize the store model with RTN W4A8 and save it as a real artifact; returns the manifest JSON."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from quant.artifacts import ArtifactManifest, save_artifact
    from quant.calibration.data import CalibrationData
    from quant.methods.base import get_method
    from quant.recipes.schema import Recipe

    import torch

    model = LlamaForCausalLM.from_pretrained(model_folder, use_kernels=False).eval()  # (quant.models.store says why)
    model.generation_config.eos_token_id = None
    recipe = Recipe.model_validate(RECIPE)
    calib = CalibrationData(torch.randint(3, 128, (4, 64)), batch_size=4)
    qmodel = get_method("rtn").calibrate(model, calib, recipe)
    manifest = save_artifact(
        qmodel, artifact, ArtifactManifest(base_model_id=MODEL_ID, recipe=recipe),
        tokenizer=AutoTokenizer.from_pretrained(str(model_folder)),
    )
    return manifest.model_dump(mode="json")


def seed_succeeded_job(database_url: str, key_id: str, artifact: Path, manifest: dict[str, Any]) -> str:
    """Benchmark setup shortcut: the succeeded job whose artifact is served, written straight to the DB."""
    from datetime import timedelta

    from sqlalchemy import select

    from service.db.models import ApiKey, Artifact, Job, JobState
    from service.db.session import make_engine, make_session_factory
    from service.db.types import utcnow

    engine = make_engine(database_url)
    try:
        with make_session_factory(engine)() as session:
            key = session.scalar(select(ApiKey).where(ApiKey.key_id == key_id))
            now = utcnow()
            job = Job(api_key_id=key.id, model_id=MODEL_ID, recipe=RECIPE, recipe_name="bench-rtn", device="cpu",
                      state=JobState.succeeded, progress=100, deadline_at=now + timedelta(hours=1),
                      started_at=now, finished_at=now)
            session.add(job)
            session.flush()
            session.add(Artifact(job_id=job.id, path=str(artifact), sha256=manifest["weights_sha256"],
                                 size_bytes=manifest["size_bytes"], manifest=manifest))
            session.commit()
            return job.id
    finally:
        engine.dispose()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def api_server(env: dict[str, str], log_path: Path) -> Iterator[str]:
    """uvicorn (one process) on a free loopback port; yields its base URL once /healthz answers."""
    port = free_port()
    cmd = [sys.executable, "-m", "uvicorn", "--factory", "service.app:create_app", "--host", "127.0.0.1",
           "--port", str(port), "--log-level", "warning", "--no-access-log", "--timeout-keep-alive", "30"]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"API server exited with {proc.returncode}; see {log_path}")
            try:
                if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"API server did not become healthy; see {log_path}")
            time.sleep(0.2)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)


@contextmanager
def database(spec: str, workdir: Path) -> Iterator[str]:
    if spec == "sqlite":
        yield f"sqlite:///{workdir / 'qaas.db'}"
        return
    from service.testing import fresh_postgres_database

    with fresh_postgres_database(spec, prefix="qaas_bench") as url:
        yield url


def purge_broker(redis_url: str) -> int:
    """Drop the Celery queues this run filled (no worker consumed them)."""
    import redis

    client = redis.Redis.from_url(redis_url)
    keys = [k for k in ("cpu", "gpu") if client.exists(k)]
    keys += list(client.scan_iter("_kombu.binding.*"))
    return int(client.delete(*keys)) if keys else 0


# ------------------------------------------------------------------------------------ load
@dataclass
class PhaseResult:
    name: str
    clients: int
    requests: int
    ok: int
    errors: int
    seconds: float
    per_second: float
    p50_ms: float
    p99_ms: float
    mean_ms: float
    extra: dict[str, float] = field(default_factory=dict)
    error_samples: list[str] = field(default_factory=list)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


async def run_phase(
    name: str,
    url: str,
    headers: dict[str, str],
    clients: int,
    max_requests: int,
    max_seconds: float,
    call: Callable[[httpx.AsyncClient, int], Awaitable[httpx.Response]],
    expect: int,
    on_ok: Callable[[httpx.Response], None] | None = None,
) -> PhaseResult:
    """``clients`` concurrent loops issue ``call`` until ``max_requests`` were started or time is up."""
    latencies: list[float] = []
    errors: list[str] = []
    issued = 0
    start = time.perf_counter()
    deadline = start + max_seconds

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal issued
        while issued < max_requests and time.perf_counter() < deadline:
            index = issued
            issued += 1
            t0 = time.perf_counter()
            try:
                response = await call(client, index)
            except httpx.HTTPError as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                continue
            if response.status_code == expect:
                latencies.append(time.perf_counter() - t0)
                if on_ok is not None:
                    on_ok(response)
            else:
                errors.append(f"{response.status_code}: {response.text[:200]}")

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120, limits=limits) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
    seconds = time.perf_counter() - start
    ms = [x * 1000 for x in latencies]
    return PhaseResult(
        name=name, clients=clients, requests=issued, ok=len(latencies), errors=len(errors), seconds=round(seconds, 3),
        per_second=round(len(latencies) / seconds, 2), p50_ms=round(percentile(ms, 0.5), 1),
        p99_ms=round(percentile(ms, 0.99), 1), mean_ms=round(statistics.fmean(ms), 1) if ms else float("nan"),
        error_samples=errors[:3],
    )


def prompt_for(i: int) -> str:
    rng = random.Random(i)
    return " ".join(rng.choice(PROMPT_WORDS) for _ in range(rng.randint(3, 8)))


async def inference_phase(name: str, url: str, headers: dict[str, str], job_id: str, args: argparse.Namespace) -> PhaseResult:
    body = {"model": job_id, "prompt": "warm up", "max_tokens": 2, "temperature": 0}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120) as client:
        warm = await client.post("/v1/completions", json=body)  # loads the artifact
        warm.raise_for_status()
    tokens = 0

    def count(response: httpx.Response) -> None:
        nonlocal tokens
        tokens += response.json()["usage"]["completion_tokens"]

    async def complete(client: httpx.AsyncClient, i: int) -> httpx.Response:
        return await client.post("/v1/completions", json={
            "model": job_id, "prompt": prompt_for(i), "max_tokens": args.max_tokens, "temperature": 0})

    result = await run_phase(name, url, headers, args.clients, args.inference_requests, args.max_seconds,
                             complete, 200, count)
    result.extra["completion_tokens_per_s"] = round(tokens / result.seconds, 1)
    result.extra["max_tokens"] = args.max_tokens
    return result


async def jobs_phases(url: str, headers: dict[str, str], args: argparse.Namespace) -> list[PhaseResult]:
    job_ids: list[str] = []
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120) as client:  # warm-up, not measured
        warm = await client.post("/v1/jobs", json={"model_id": MODEL_ID, "recipe": RECIPE})
        warm.raise_for_status()
        (await client.get(f"/v1/jobs/{warm.json()['id']}")).raise_for_status()

    async def submit(client: httpx.AsyncClient, i: int) -> httpx.Response:
        return await client.post("/v1/jobs", json={"model_id": MODEL_ID, "recipe": RECIPE})

    submitted = await run_phase("submit job (POST /v1/jobs)", url, headers, args.clients, args.submit_requests,
                                args.max_seconds, submit, 201, lambda r: job_ids.append(r.json()["id"]))
    if not job_ids:
        raise RuntimeError(f"no job was accepted: {submitted.error_samples}")
    rng = random.Random(0)

    async def status(client: httpx.AsyncClient, i: int) -> httpx.Response:
        return await client.get(f"/v1/jobs/{rng.choice(job_ids)}")

    polled = await run_phase("job status (GET /v1/jobs/{id})", url, headers, args.clients, args.status_requests,
                             args.max_seconds, status, 200)
    return [submitted, polled]


# ------------------------------------------------------------------------------------ report
def table(results: list[PhaseResult]) -> str:
    head = "| phase | clients | ok / sent | errors | req/s | p50 ms | p99 ms | notes |"
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        notes = ", ".join(f"{k}={v}" for k, v in r.extra.items())
        lines.append(f"| {r.name} | {r.clients} | {r.ok} / {r.requests} | {r.errors} | {r.per_second} | "
                     f"{r.p50_ms} | {r.p99_ms} | {notes} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--submit-requests", type=int, default=500)
    p.add_argument("--status-requests", type=int, default=2000)
    p.add_argument("--inference-requests", type=int, default=200)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--max-seconds", type=float, default=90.0, help="time bound of each phase")
    p.add_argument("--batch-size", type=int, default=32, help="max_batch_size of the batching engine")
    p.add_argument("--max-wait-ms", type=float, default=10.0)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--torch-threads", type=int, default=1,
                   help="intra-op threads of the server process (OMP_NUM_THREADS); 0 leaves torch's default")
    p.add_argument("--skip-jobs", action="store_true", help="only the inference phases")
    p.add_argument("--database", default="sqlite", help="'sqlite' or a PostgreSQL admin URL (a fresh DB is made)")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/12", help="Celery broker; its queues are purged after")
    p.add_argument("--machine", default="CPU box (2 cores, no GPU)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--results-md", type=Path, default=REPO / "benchmarks" / "RESULTS.md")
    p.add_argument("--no-append", action="store_true", help="do not append to RESULTS.md")
    args = p.parse_args(argv)

    load_before = os.getloadavg()
    workdir = Path(tempfile.mkdtemp(prefix="qaas-bench-"))
    admin_token = secrets.token_urlsafe(16)
    results: list[PhaseResult] = []
    try:
        store = workdir / "model_store"
        model_folder = build_model_store(store, args.hidden, args.layers)
        artifact = workdir / "artifacts" / "bench-rtn"
        manifest = build_artifact(model_folder, artifact)
        with database(args.database, workdir) as db_url:
            env = {
                "QAAS_DATABASE_URL": db_url,
                "QAAS_REDIS_URL": args.redis_url,
                "QAAS_ARTIFACT_DIR": str(workdir / "artifacts"),
                "QAAS_MODEL_STORE": str(store),
                "QAAS_ADMIN_TOKEN": admin_token,
                "QAAS_LOG_LEVEL": "WARNING",
                "QAAS_INFERENCE_DEVICE": "cpu",
                "QAAS_INFERENCE_MAX_WAIT_MS": str(args.max_wait_ms),
                "PYTHONPATH": str(REPO),
            }
            if args.torch_threads > 0:
                env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.torch_threads)
            batched_env = {**env, "QAAS_INFERENCE_MAX_BATCH_SIZE": str(args.batch_size)}
            with api_server(batched_env, workdir / "server-batched.log") as url:
                created = httpx.post(url + "/v1/admin/api-keys", json={"owner": "bench"},
                                     headers={"X-Admin-Token": admin_token}, timeout=30)
                created.raise_for_status()
                key = created.json()
                headers = {"X-API-Key": key["api_key"]}
                job_id = seed_succeeded_job(db_url, key["key_id"], artifact, manifest)
                if not args.skip_jobs:
                    results += asyncio.run(jobs_phases(url, headers, args))
                batched = asyncio.run(inference_phase(
                    f"completions, batching engine (max_batch_size={args.batch_size})", url, headers, job_id, args))
                results.append(batched)
            unbatched_env = {**env, "QAAS_INFERENCE_MAX_BATCH_SIZE": "1"}
            with api_server(unbatched_env, workdir / "server-unbatched.log") as url:
                results.append(asyncio.run(inference_phase(
                    "completions, unbatched (max_batch_size=1)", url, headers, job_id, args)))
        purged = purge_broker(args.redis_url)
    except BaseException:
        for log in sorted(workdir.glob("server-*.log")):
            sys.stderr.write(f"--- {log.name}\n{log.read_text()[-4000:]}\n")
        raise
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    load_after = os.getloadavg()
    speedup = results[-2].per_second / results[-1].per_second if results[-1].per_second else float("nan")
    stamp = datetime.now(timezone.utc)
    report = {
        "benchmark": "service_load",
        "machine": args.machine,
        "host": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                 "loadavg_1_5_15_before": [round(x, 2) for x in load_before],
                 "loadavg_1_5_15_after": [round(x, 2) for x in load_after]},
        "timestamp": stamp.isoformat(),
        "database": "sqlite" if args.database == "sqlite" else "postgresql",
        "model": {"id": MODEL_ID, "hidden": args.hidden, "layers": args.layers, "weights": "random",
                  "recipe": RECIPE, "artifact_bytes": manifest["size_bytes"]},
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "results_md")},
        "broker_keys_purged": purged,
        "batched_vs_unbatched_speedup": round(speedup, 2),
        "phases": [asdict(r) for r in results],
    }
    text = table(results)
    print(text)
    print(f"batching engine vs unbatched: {speedup:.2f}x requests/s")
    args.out.mkdir(parents=True, exist_ok=True)
    out_file = (args.out / f"service_load_{stamp.strftime('%Y%m%dT%H%M%SZ')}.json").resolve()
    out_file.write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {out_file}")
    if not args.no_append:
        with open(args.results_md, "a") as md:
            md.write(
                f"\n## service_load — {stamp.strftime('%Y-%m-%d %H:%M UTC')} — {args.machine}\n\n"
                f"`python -m benchmarks.service_load` ({report['database']}, Celery enqueue to Redis, no worker "
                f"consuming; {args.clients} concurrent clients; server (OMP_NUM_THREADS={args.torch_threads or 'default'}) "
                f"and clients on the same machine; 1-min load average {load_before[0]:.1f} before, "
                f"{load_after[0]:.1f} after: other work shared the cores). "
                f"Inference: LLaMA-shaped {args.layers}x{args.hidden} random-weight model, RTN W4A8 g64 artifact, "
                f"greedy, max_tokens={args.max_tokens}, reference QuantLinear path on CPU. "
                f"Batching engine vs unbatched: {speedup:.2f}x requests/s. Raw: `{out_file.relative_to(REPO)}`.\n\n"
                f"{text}\n"
            )
    return report


if __name__ == "__main__":
    main()
