#!/usr/bin/env bash
# The main job: set up (the package and what the job needs, no development tools), then train the BatchNorm CNN on
# the bundled digits with every piece of the plugin switched on (warmup SGD, BN recalibration, BN and weight
# dynamics monitoring), test it, and print the test accuracy. Extra arguments go to `lightning-bnsgd fit`.
set -euo pipefail
BNSGD_EXTRAS="${BNSGD_EXTRAS-}"
# shellcheck source=scripts/setup.sh
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
echo "[run_main] lightning-bnsgd fit --config src/lightning_bnsgd/configs/digits.yaml $*" >&2
lightning-bnsgd fit --config src/lightning_bnsgd/configs/digits.yaml "$@"
