#!/usr/bin/env bash
# Build (or reuse) the project's virtual environment and install cambrian into it, editable.
#
# The environment is cached outside the checkout, keyed by the requirement files and the Python version, so a
# second clone (or CI run) reuses it in seconds; `.venv` in the checkout is a link to it.
#   CAMBRIAN_CACHE   cache root (default: ~/.cache/cambrian)
#   PYTHON           interpreter to build the venv with (default: python3)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
CACHE=${CAMBRIAN_CACHE:-$HOME/.cache/cambrian}
REQS=(requirements-torch.txt requirements.txt requirements-nodeps.txt)
key=$( { "$PYTHON" --version 2>&1; cat "${REQS[@]}"; } | sha256sum | cut -c1-16)
venv="$CACHE/venvs/main-$key"

if [ -e .venv ] && [ ! -L .venv ]; then
    echo "[setup] using the existing .venv folder (remove it to build the cached, shared environment)"
else
    if [ ! -x "$venv/bin/python" ] || [ ! -f "$venv/.complete" ]; then
        echo "[setup] building the environment in $venv (torch from local disk; about 2 minutes)"
        rm -rf "$venv"
        mkdir -p "$CACHE/venvs"
        "$PYTHON" -m venv "$venv"   # venvs hard-code their path: build in place, mark complete at the end
        pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
        "${pip[@]}" -r requirements-torch.txt
        "${pip[@]}" -r requirements.txt
        "${pip[@]}" --no-deps -r requirements-nodeps.txt
        touch "$venv/.complete"
    else
        echo "[setup] reusing the environment in $venv"
    fi
    ln -sfn "$venv" .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e . 2>&1 \
    | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import cambrian_core, torch; print('[setup] cambrian', cambrian_core.__version__, '| torch', torch.__version__)"
