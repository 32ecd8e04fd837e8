#!/usr/bin/env bash
# Sets up the project (bash setup.bash), fetches the small real test assets, and runs the test suite.
# Usage: bash run_tests.bash [pytest args]
set -euo pipefail
cd "$(dirname "$0")"
bash setup.bash
exec .venv/bin/python -m pytest -q tests "$@"
