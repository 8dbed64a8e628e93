#!/usr/bin/env bash
# Rebuild generated/ from examples/ with the CLI (what tests/test_generated.py checks). CUDA is
# verified under the host emulation even on a GPU machine, so the manifests are the same there.
set -euo pipefail
cd "$(dirname "$0")/.."
target="${GNCODEGEN_TARGET:-all}"
for spec in examples/*.yaml; do
    gncodegen build "$spec" --target "$target" --cuda-runner emulation
done
