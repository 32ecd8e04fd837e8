#!/usr/bin/env bash
# The 2018 README's build step, kept where its users run it: builds graph_utils (graph_utils/compile.bash
# does the work, through `pip install --no-build-isolation -e .` in .venv; setup.bash calls it too).
# Then `python test_matmul.py` checks the product.
# Usage: bash compile.bash [--force]
set -euo pipefail
exec bash "$(dirname "$0")/graph_utils/compile.bash" "$@"
