#!/usr/bin/env bash
# Set up an environment on a fresh machine (sourced by run_main.sh and test.sh; usable alone: `bash scripts/setup.sh`).
#
# 1. Uses the active virtual environment, or creates (and then reuses) .venv.
# 2. torch, only when none is installed: `pip install torch==2.13.0`. From the public package index that is the
#    default build for the platform, which on Linux x86_64 is the CUDA build (about twenty CUDA wheels, several GB):
#    right for a GPU machine. Set BNSGD_TORCH=cpu for the CPU build from PyTorch's own CPU wheel index, or install
#    the build you want before running this script (an installed torch is kept). Where a torch 2.13.0 wheel is
#    provided locally (a pip configuration pointing at it), the plain pin takes that one.
# 3. The package, editable, with the extras in BNSGD_EXTRAS (comma-separated; the caller sets its default: none for
#    the main job, "test" for the tests; "dev" adds docs, lint and type checker). Skipped when the same extras were
#    installed from the same pyproject.toml before (a stamp file in the environment records it).
# 4. With BNSGD_NPM=1 (test.sh sets it) and npm available: `npm ci`, the pinned Mermaid that the docs tests parse
#    every diagram with and the docs site bundles.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
say() { echo "[setup] $*" >&2; }
if [ -z "${VIRTUAL_ENV:-}" ]; then
    if [ ! -x .venv/bin/python ]; then
        say "creating the virtual environment .venv"
        python3 -m venv .venv
    fi
    # shellcheck disable=SC1091
    source .venv/bin/activate
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! python -c "import torch" >/dev/null 2>&1; then
    case "${BNSGD_TORCH:-default}" in
    cpu)
        say "installing torch==2.13.0, CPU build, from PyTorch's CPU wheel index (BNSGD_TORCH=cpu)"
        python -m pip install --quiet "torch==2.13.0" --index-url "https://download.pytorch.org/whl/cpu"
        ;;
    default)
        say "installing torch==2.13.0 (the platform's default build: on Linux from the public index, the CUDA build"
        say "of several GB; BNSGD_TORCH=cpu takes the CPU build instead; this can take minutes)"
        python -m pip install --quiet "torch==2.13.0"
        ;;
    *)
        echo "[setup] BNSGD_TORCH=${BNSGD_TORCH} is not a choice: use 'cpu', or leave it unset" >&2
        exit 2
        ;;
    esac
fi
extras="${BNSGD_EXTRAS-}"
target="."
[ -n "$extras" ] && target=".[$extras]"
stamp="${VIRTUAL_ENV}/.lightning-bnsgd-setup"
want="$(python -c 'import hashlib,sys; print(hashlib.sha256(open("pyproject.toml","rb").read()).hexdigest())') ${target}"
hash="${want%% *}"
if [ -f "$stamp" ] && { grep -qxF "$want" "$stamp" || { [ "$target" = "." ] && grep -q "^${hash} " "$stamp"; }; }; then
    say "lightning-bnsgd ${target} already installed from this pyproject.toml"
else
    say "installing lightning-bnsgd: pip install -e \"${target}\" (a minute or two on a fresh environment)"
    python -m pip install --quiet -e "$target"
    echo "$want" >>"$stamp"
fi
if [ "${BNSGD_NPM:-0}" = 1 ]; then
    if command -v npm >/dev/null 2>&1; then
        if [ ! -f node_modules/.package-lock.json ] || ! cmp -s package-lock.json node_modules/.package-lock.json; then
            say "installing the docs tools: npm ci (Mermaid, for the diagram checks)"
            npm ci --no-audit --no-fund --loglevel=error >&2
        fi
    else
        say "npm not found: the Mermaid diagram checks of the docs tests will be skipped"
    fi
fi
