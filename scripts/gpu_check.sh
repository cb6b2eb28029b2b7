#!/bin/bash
# The checks that need a CUDA machine, as one run: every gpu-marked test, then the SVA benchmark on CUDA.
# Writes logs under ${OUT:-gpu_check_out}. On a machine whose image lacks some packages, put their wheels
# (and a freshly built cambrian wheel: `pip wheel --no-deps -w .whl .`) in .whl/ and they are installed into
# /tmp/site first (no network needed). Budget: ~4 min of tests and ~5 min of benchmarks on one H200.
# BENCH=0 skips the benchmarks, CPU_SUITES=0 the CPU suites.
set -o pipefail
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=$PWD:/tmp/site
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())" 2>&1 | tee "$OUT/versions.txt"
# a test module whose optional server packages are missing must not stop the others from being collected
timeout 420 python3 -m pytest -p no:cacheprovider -q -m gpu tests --continue-on-collection-errors -rA -W ignore 2>&1 \
    | tee "$OUT/gpu_tests.log" | grep -E "PASSED|FAILED|ERROR|passed|failed" | tail -40
[ "${BENCH:-1}" = 1 ] && for input in staged tokens; do
    timeout 200 python3 benchmarks/bench_sva.py --device cuda --repeats 10 --tower-input $input --dtype both \
        2>&1 | grep -v -i warn | tee "$OUT/bench_sva_$input.log" | tail -30
done
# CPU suites under this machine's torch: one thread per worker, or 16 workers x 16 threads crawl
[ "${CPU_SUITES:-1}" = 1 ] && OMP_NUM_THREADS=1 timeout 300 python3 -m pytest -p no:cacheprovider -q -n 12 -W ignore -rfE --tb=short \
    tests/test_model.py tests/test_connectors.py tests/test_encoders.py tests/test_llms.py tests/test_templates.py \
    2>&1 | tee "$OUT/cpu_suites.log" | tail -15
