#!/usr/bin/env bash
# Install, then run the whole test suite (slow tests included) on GRPO_TEST_WORKERS processes (default 2, one per
# core of a small machine; 1 runs it in this process). The tests that launch several processes run one at a time
# on one worker; every other file runs whole on some worker (tests/conftest.py, pytest_xdist_make_scheduler).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
workers="${GRPO_TEST_WORKERS:-2}"
if [ "$workers" -gt 1 ]; then
  exec python -m pytest -q -n "$workers" --dist loadfile "$@"
fi
exec python -m pytest -q "$@"
