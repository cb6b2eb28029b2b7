#!/usr/bin/env bash
# The test command of the README (and of CI): set up (cached), then run the whole suite.
#   extra arguments go to pytest, e.g.  bash scripts/test.sh -m "not slow" -x
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False TOKENIZERS_PARALLELISM=false
export DS_ACCELERATOR=cpu PJRT_DEVICE=CPU

bash scripts/setup.sh
# torch_xla lives in its own venv (it is ABI-bound to torch 2.9); built once and cached, skipped if unavailable.
if [ -f requirements-xla.txt ] && [ -z "${CAMBRIAN_SKIP_XLA:-}" ]; then
    if xla_python=$(bash scripts/setup_xla.sh); then
        export CAMBRIAN_XLA_PYTHON=$xla_python
    else
        echo "[test] torch_xla venv unavailable: xla-marked tests will be skipped" >&2
    fi
fi

.venv/bin/ruff check .
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "[test] pytest collected no tests" >&2
    exit 1
fi
exit "$rc"
