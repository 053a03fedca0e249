#!/usr/bin/env bash
# The CUDA path, exercised in under 10 minutes on a machine with a CUDA GPU and llmkit installed over
# a CUDA build of torch (`make dev` pins the CPU build; install the CUDA wheel of the same version):
#   1. tests/test_device.py on cuda: llmkit.generate (eager and compiled), the scheduler (compiled
#      decode step) and `llmkit serve --device cuda` through the openai client, each against the
#      CPU's greedy tokens and logprobs;
#   2. benchmarks/serve.py with llmkit on the GPU (bf16, compiled decode) against llama.cpp's server
#      on the CPU, concurrency 1 and 16 -> benchmarks/results/serve_cuda.json.
#
#   bash benchmarks/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
"$PYTHON" - <<'PY'
import sys, torch
if not torch.cuda.is_available():
    sys.exit(f"no CUDA device (torch {torch.__version__}): this script checks the GPU path")
print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
PY
export HF_HUB_OFFLINE=1 LLMKIT_TEST_DEVICE=cuda
start=$SECONDS
timeout 300 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_device.py
timeout 300 "$PYTHON" benchmarks/serve.py --llmkit-args "--device cuda --dtype bfloat16" --concurrency 1 16 \
    --rounds 1 --skip multiturn chunked memory --out benchmarks/results/serve_cuda.json
echo "gpu.sh: $((SECONDS - start)) s"
