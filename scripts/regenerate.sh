#!/usr/bin/env bash
# Rebuild generated/ from examples/ with the CLI (what tests/test_generated.py checks).
set -euo pipefail
cd "$(dirname "$0")/.."
target="${GNCODEGEN_TARGET:-all}"
for spec in examples/*.yaml; do
    gncodegen build "$spec" --target "$target"
done
