#!/usr/bin/env bash
# The main job: set up, then train the BatchNorm CNN on the bundled digits with every piece of the plugin switched
# on (warmup SGD, BN recalibration, BN monitoring), test it, and print the test accuracy.
set -euo pipefail
# shellcheck source=scripts/setup.sh
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
lightning-bnsgd fit --config src/lightning_bnsgd/configs/digits.yaml "$@"
