#!/usr/bin/env bash
# A < 5-minute check of a CUDA machine (issue 19): the CUDA-only tests, a few hundred paper-scale training
# steps of every Table 2 / Table 5 model with throughput and peak memory, and bf16 against float32; one
# summary at the end. Extra arguments go to python -m flowlib.gpu_check (e.g. --seconds 4).
set -euo pipefail
cd "$(dirname "$0")/.."
make --no-print-directory setup >/dev/null
echo "== CUDA-only tests"
.venv/bin/python -m pytest -q -k cuda tests/test_models.py
echo "== paper-scale steps and bf16"
.venv/bin/python -m flowlib.gpu_check "$@"
