#!/usr/bin/env bash
# The sandbox's adversarial tests again as an unprivileged user (nobody): bubblewrap and unshare without root's
# capabilities. `bash scripts/test_sandbox_unprivileged.sh [python]`. Runs where the machine allows it: as root (to
# become nobody) with setpriv, and a Python environment and checkout that nobody can use. Elsewhere it says why and
# succeeds.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${1:-$(command -v python)}"
as_nobody=(env HOME=/tmp MPLCONFIGDIR=/tmp PYTHONPATH="$PWD" setpriv --reuid=65534 --regid=65534 --clear-groups)
if [ "$(id -u)" != 0 ] || ! command -v setpriv >/dev/null; then
  echo "unprivileged sandbox tests: not run (it takes root, to become nobody, and setpriv)"
  exit 0
fi
# nobody must read the environment and the checkout, and a sandbox must start for nobody (a bind of an installation
# under a directory nobody cannot enter, e.g. /root, cannot)
probe='from rewards.sandbox import resolve_sandbox, run_code; import sys; sys.exit(run_code("print(6 * 7)", kind=resolve_sandbox()).output != "42\n")'
if ! "${as_nobody[@]}" "$python" -c "import grpo, torch, pytest; $probe" >/dev/null 2>&1; then
  echo "unprivileged sandbox tests: not run (as nobody, $python cannot import the project or start a sandbox here)"
  exit 0
fi
exec "${as_nobody[@]}" "$python" -m pytest -q -p no:cacheprovider tests/unit/test_rewards_adversarial.py \
  tests/unit/test_rewards_code.py
