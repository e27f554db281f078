#!/usr/bin/env bash
# The built-in demo: install, then GRPO on the warm-started tiny model (arithmetic, CPU, a few minutes).
# Extra arguments are Hydra overrides, e.g. `bash scripts/demo.sh train.max_steps=50`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec grpo-train experiment=demo "$@"
