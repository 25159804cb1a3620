#!/usr/bin/env bash
# The test command (README): installs everything, starts PostgreSQL/Redis if down, runs the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export QAAS_TEST_DATABASE_URL=${QAAS_TEST_DATABASE_URL:-postgresql+psycopg2://postgres@127.0.0.1:5432/test}
export QAAS_TEST_REDIS_URL=${QAAS_TEST_REDIS_URL:-redis://127.0.0.1:6379/15}
exec python3 -m pytest -q -p no:cacheprovider "$@"
