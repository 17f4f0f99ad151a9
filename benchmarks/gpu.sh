#!/bin/bash
# README's "On a GPU", where a CUDA GPU is: the CUDA tests, then the long budgets (transfer with three seeds) and the
# CNN defaults as benchmarks/accuracy.py candidates, so each run becomes a row of benchmarks/accuracy.csv.
# Run from the repository root; the data comes from $FMNIST_DATA or the usual places (fmnist/data.py), the
# interpreter from $PYTHON (default python3).
set -eu  # a failing CUDA test or candidate ends the script with its status
python=${PYTHON:-python3}
gpu=$("$python" -c "import torch; print(torch.cuda.get_device_name(), 'torch', torch.__version__)" 2>/dev/null) ||
    { echo "benchmarks/gpu.sh: no CUDA GPU for $python (torch.cuda.get_device_name() failed)" >&2; exit 2; }
"$python" -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py
note="GPU: $gpu; wall includes the test evaluation on its CPU"
"$python" benchmarks/accuracy.py transfer "--budget long" "--budget long train.seed=1" "--budget long train.seed=2" \
    --note "$note"
"$python" benchmarks/accuracy.py cnn "--budget long" "" --note "$note"
