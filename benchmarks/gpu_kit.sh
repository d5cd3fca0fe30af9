#!/usr/bin/env bash
# The GPU kit: see benchmarks/gpu_kit.py. On a CUDA machine, from the repository root with gaq installed:
#   bash benchmarks/gpu_kit.sh --out runs/gpu-kit
# Anywhere, to check the plumbing (tiny sizes, CPU providers, exit 0):
#   bash benchmarks/gpu_kit.sh --dry-run --out /tmp/gpu-kit
# Reproduces: docs/benchmarks.md, "Deployment: OpenVINO, Optimum's pipeline, the GPU kit".
set -euo pipefail
cd "$(dirname "$0")/.."
exec python benchmarks/gpu_kit.py "$@"
