"""docker-compose.yml is structurally sound (Docker does not run here, so this is what we can check):
every service healthy-checked, start order by health, GPU reservation, shared volumes, and the
commands point at code that exists."""

from __future__ import annotations

import importlib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]


def test_services_and_healthchecks() -> None:
    assert {"api", "worker-gpu", "worker-cpu", "beat", "redis", "postgres"} <= set(SERVICES)
    for name, svc in SERVICES.items():
        hc = svc.get("healthcheck")
        assert hc and hc["test"] and hc.get("interval"), name
        assert "image" in svc or "build" in svc, name


def test_start_order_waits_for_health() -> None:
    api = SERVICES["api"]["depends_on"]
    assert api == {"postgres": {"condition": "service_healthy"}, "redis": {"condition": "service_healthy"}}
    for name in ("worker-gpu", "worker-cpu", "beat"):
        assert SERVICES[name]["depends_on"]["api"]["condition"] == "service_healthy", name


def test_gpu_worker_reserves_an_nvidia_device_and_builds_kernels() -> None:
    gpu = SERVICES["worker-gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert "gpu" in gpu["command"][gpu["command"].index("-Q") + 1].split(",")
    dockerfile = ROOT / gpu["build"]["dockerfile"]
    text = dockerfile.read_text()
    assert text.startswith("#") and "FROM nvidia/cuda:" in text and "-devel" in text
    assert "TORCH_CUDA_ARCH_LIST" in text
    assert "python -m kernels.build" in text  # CUDA kernels compiled into the image
    assert (ROOT / "kernels" / "build.py").is_file()
    assert "cpu" in SERVICES["worker-cpu"]["command"]


def test_volumes_and_environment_are_consistent() -> None:
    declared = set(COMPOSE["volumes"])
    for name, svc in SERVICES.items():
        for mount in svc.get("volumes", []):
            source = mount.split(":", 1)[0]
            assert source in declared, (name, source)
    for name in ("api", "worker-gpu", "worker-cpu", "beat"):
        env = SERVICES[name]["environment"]
        assert env["QAAS_DATABASE_URL"].startswith("postgresql+psycopg2://") and "@postgres:5432/" in env["QAAS_DATABASE_URL"]
        assert env["QAAS_REDIS_URL"] == "redis://redis:6379/0"
    for name in ("api", "worker-gpu", "worker-cpu"):
        mounts = {m.split(":")[1] for m in SERVICES[name]["volumes"]}
        assert {"/data/artifacts", "/data/models"} <= mounts, name


def test_commands_reference_real_code() -> None:
    factory = SERVICES["api"]["command"][SERVICES["api"]["command"].index("--factory") + 1]
    module, attr = factory.split(":")
    assert callable(getattr(importlib.import_module(module), attr))
    for name in ("worker-gpu", "worker-cpu", "beat"):
        cmd = SERVICES[name]["command"]
        assert cmd[:3] == ["celery", "-A", "workers.app"], name
    assert importlib.import_module("workers.app").app.main == "qaas"
    for dockerfile in {svc["build"]["dockerfile"] for svc in SERVICES.values() if "build" in svc}:
        text = (ROOT / dockerfile).read_text()
        for copied in ("quant", "service", "workers", "migrations", "alembic.ini"):
            assert copied in text, (dockerfile, copied)
