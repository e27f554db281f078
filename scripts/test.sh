#!/usr/bin/env bash
# Install, then run the whole test suite (slow tests included; about 40 minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec python -m pytest -q "$@"
