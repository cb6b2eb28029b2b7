#!/usr/bin/env bash
# Build (or reuse) the separate torch_xla venv (torch 2.9.0 + torch_xla 2.9.0, PJRT_DEVICE=CPU) and print its
# python. Cached outside the checkout, keyed by requirements-xla.txt; the first build downloads about 3.7 GB.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=${CAMBRIAN_CACHE:-$HOME/.cache/cambrian}
key=$( { python3 --version 2>&1; cat requirements-xla.txt requirements.txt; } | sha256sum | cut -c1-16)  # -xla includes the main file
venv="$CACHE/venvs/xla-$key"
if [ ! -f "$venv/.complete" ]; then
    echo "[setup-xla] building $venv (about 2-3 minutes)" >&2
    rm -rf "$venv"
    mkdir -p "$CACHE/venvs"
    python3 -m venv "$venv" >&2
    "$venv/bin/python" -m pip install -q --disable-pip-version-check -r requirements-xla.txt >&2
    touch "$venv/.complete"
fi
# the checkout under test, without touching the venv's pinned packages
"$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e . >&2 2>/dev/null \
    || "$venv/bin/python" -m pip install -q --no-deps -e . >&2
echo "$venv/bin/python"
