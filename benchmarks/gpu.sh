#!/bin/bash
# README's "On a GPU", reproduced where a CUDA GPU is: the CUDA tests, then the long budgets (transfer with three
# seeds) and the CNN defaults, each one `fmnist train --dry-run` (tracking off). Logs go to $OUT (default
# outputs/gpu); the last line of each run's log is its summary. Arguments are passed to every run, e.g.
#     bash benchmarks/gpu.sh --data-dir /path/to/fashion-mnist
# $PYTHON picks the interpreter (default python3); this package must be importable by it (pip install -e ., or the
# repository root as the working directory).
set -u
out=${OUT:-outputs/gpu}
python=${PYTHON:-python3}
mkdir -p "$out"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$python" -c "import sys, torch; print(sys.version.split()[0], torch.__version__)"; } 2>&1 | tee "$out/env.log"
"$python" -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py 2>&1 | tee "$out/test_cuda.log"
for run in "transfer --budget long" "transfer --budget long train.seed=1" "transfer --budget long train.seed=2" \
           "cnn --budget long" "cnn"; do
    name=$(echo "$run" | tr -c 'a-z0-9\n' '-' | tr -s '-')
    start=$(date +%s)
    # shellcheck disable=SC2086  # $run is several words on purpose
    "$python" -m fmnist train --dry-run --arch $run "$@" 2>&1 | tee "$out/$name.log"
    echo "$run: exit ${PIPESTATUS[0]}, $(( $(date +%s) - start )) s wall" | tee -a "$out/$name.log"
done
