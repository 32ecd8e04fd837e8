#!/usr/bin/env bash
# Sets up the project (bash setup.bash: .venv + graph_utils), fetches the demo's emoji images with npm
# (for the scaled-down demo run in tests/test_demo.py), and runs the test suite.
# Usage: bash run_tests.bash [pytest args]
set -euo pipefail
cd "$(dirname "$0")"
bash setup.bash
.venv/bin/python demo.py fetch --ddir demo_ddir
exec .venv/bin/python -m pytest -q tests "$@"
