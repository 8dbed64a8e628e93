#!/usr/bin/env bash
# The whole test suite, on a fresh machine: system toolchains, the Python packages, then pytest.
#
#   scripts/test.sh              everything (what CI runs)
#   scripts/test.sh -k oracle    extra arguments go to pytest
#
# Uses the active virtual environment, or makes ./.venv when none is active.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-toolchains.sh

if [ -n "${VIRTUAL_ENV:-}" ]; then
    py="$VIRTUAL_ENV/bin/python"
else
    [ -x .venv/bin/python ] || python3 -m venv .venv
    py="$PWD/.venv/bin/python"
fi
"$py" -m pip install -q --disable-pip-version-check -e '.[test,bench]'
export PATH="$(dirname "$py"):$PATH"     # the gncodegen console script

exec "$py" -m pytest -n 2 -p no:cacheprovider "$@"
