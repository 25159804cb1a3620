#!/usr/bin/env bash
# The main job (README): install, start the stack on the embedded default (SQLite + a real Celery
# worker on the local Redis), quantize a real small model end to end, print its metrics.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec python3 -m service.demo "$@"
