"""Helpers for tests and the demo: throwaway PostgreSQL databases and Celery worker processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import create_engine, make_url, text

REPO_ROOT = Path(__file__).resolve().parents[1]


@contextmanager
def fresh_postgres_database(admin_url: str, prefix: str = "qaas_test") -> Iterator[str]:
    """Create an empty database next to ``admin_url``'s and drop it afterwards; yields its URL."""
    url = make_url(admin_url)
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        yield url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


class WorkerProcess:
    """``celery -A workers.app worker`` as a subprocess (its own process group)."""

    def __init__(self, env: dict[str, str], queues: str = "cpu", concurrency: int = 1, pool: str = "prefork",
                 log_path: Path | None = None, name: str | None = None, beat: bool = False) -> None:
        self.name = name or f"qaas-{uuid.uuid4().hex[:6]}@%h"
        cmd = [sys.executable, "-m", "celery", "-A", "workers.app", "worker", "-Q", queues, "-c", str(concurrency),
               "-P", pool, "-n", self.name, "--loglevel", "INFO", "--without-gossip", "--without-mingle"]
        if beat:
            cmd += ["-B", "-s", str((log_path.parent if log_path else Path(".")) / "celerybeat-schedule")]
        self.log_path = log_path
        self._log = open(log_path, "ab") if log_path else subprocess.DEVNULL
        full_env = {**os.environ, **env}
        full_env.setdefault("PYTHONPATH", str(REPO_ROOT))
        self.proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=full_env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the whole process group (main process and pool children)."""
        if self.alive():
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass

    def stop(self, timeout: float = 20.0) -> None:
        if self.alive():
            self.kill(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill(signal.SIGKILL)
                self.proc.wait(5)
        if hasattr(self._log, "close"):
            self._log.close()  # type: ignore[union-attr]

    def log_tail(self, chars: int = 4000) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-chars:]


def wait_for(predicate, timeout: float, interval: float = 0.2, what: str = "condition"):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)
