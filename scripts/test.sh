#!/usr/bin/env bash
# Set up (the package with its "test" extra, and the docs tools through npm where npm exists), then run the test
# suite (unit, integration, DDP on CPU, doctests, the docs' code blocks and diagrams). Extra arguments go to pytest.
set -euo pipefail
BNSGD_EXTRAS="${BNSGD_EXTRAS-test}"
BNSGD_NPM=1
# shellcheck source=scripts/setup.sh
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
echo "[test] python -m pytest $* (about 5 minutes on an idle 2-core CPU)" >&2
set +e
python -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests: failing" >&2
    exit 1
fi
exit "$rc"
