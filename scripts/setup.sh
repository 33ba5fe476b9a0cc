#!/usr/bin/env bash
# Set up a development environment on a fresh machine (sourced by run_main.sh and test.sh).
# Uses the active virtual environment, or creates/reuses .venv. Installs the CPU build torch==2.13.0 first when
# no torch is installed (an unpinned torch would pull a multi-GB CUDA build), then the package with its [dev] extra.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ -z "${VIRTUAL_ENV:-}" ]; then
    [ -x .venv/bin/python ] || python3 -m venv .venv
    # shellcheck disable=SC1091
    source .venv/bin/activate
fi
if ! python -c "import torch" >/dev/null 2>&1; then
    python -m pip install --quiet "torch==2.13.0"
fi
python -m pip install --quiet -e ".[${BNSGD_EXTRAS:-dev}]"
