#!/usr/bin/env bash
# GPU checks on one GPU, in under 8 minutes (each part has its own time limit, which is printed):
#   1. tests marked `cuda` (tests/test_cuda.py, tests/test_training_kl.py): bf16-autocast training step, graph verify, ACDC against CPU fp32
#   2. benchmarks/gpu_throughput.py: matmul and SAE training-step TFLOP/s as fractions of the device's peak
#   3. benchmarks/train_end_to_end.py --device cuda --quick: tokens/s beside sparsify and sae-lens
#   4. benchmarks/graph_scale.py --device cuda --quick: attribution graphs at real shapes
# Without a GPU it still runs to the end: the tests report themselves skipped, and the GPU parts say so.
#
#   bash benchmarks/gpu_check.sh            # PYTHON=/path/to/python to choose the interpreter
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
export HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-1} WANDB_MODE=${WANDB_MODE:-offline}
started=$(date +%s)
failures=()

part() {  # part NAME SECONDS COMMAND...: run with a time limit, record a failure or a timeout by name
    local name=$1 limit=$2
    shift 2
    echo
    echo "== $name (limit ${limit}s): $*"
    local t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@"
    local rc=$?
    echo "== $name: exit $rc after $(( $(date +%s) - t0 ))s"
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        failures+=("$name (ran past ${limit}s)")
    elif [ "$rc" -ne 0 ]; then
        failures+=("$name (exit $rc)")
    fi
}

echo "uptime: $(uptime)"
echo "git: $(git rev-parse --short HEAD 2>/dev/null || echo 'not a git checkout')"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,utilization.gpu --format=csv,noheader
fi
has_cuda=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available:', torch.cuda.is_available())"

# 1. The cuda tests run (or report their skip reason) either way.
part "cuda tests" 140 "$PY" -m pytest -q -m cuda tests/test_cuda.py tests/test_training_kl.py -rs -p no:cacheprovider

if [ "$has_cuda" != 1 ]; then
    echo
    echo "no CUDA device: the GPU benchmarks (gpu_throughput, train_end_to_end --device cuda, graph_scale --device cuda)"
    echo "are skipped; the cuda tests above report themselves skipped"
else
    # 2. Matmul and training-step fractions of the device's peak.
    part "gpu throughput" 50 "$PY" benchmarks/gpu_throughput.py

    # 3. End-to-end training beside the peers.
    if [ -f benchmarks/train_end_to_end.py ]; then
        part "train end to end" 150 "$PY" benchmarks/train_end_to_end.py --device cuda --quick
    else
        echo; echo "benchmarks/train_end_to_end.py is not in this checkout: end-to-end training on the GPU not run"
    fi

    # 4. Attribution graphs at scale; circuit-tracer's side only where its environment exists.
    if [ -f benchmarks/graph_scale.py ]; then
        extra=()
        ct_python=/tmp/fc-graph-ct-venv/bin/python
        if [ ! -x "$ct_python" ] && "$PY" benchmarks/graph_scale.py --help 2>/dev/null | grep -q -- "--no-ct"; then
            echo; echo "no circuit-tracer environment at $ct_python: graph_scale runs featcircuits alone (--no-ct)"
            extra=(--no-ct)
        fi
        part "graph scale" 90 "$PY" benchmarks/graph_scale.py --device cuda --quick ${extra[@]+"${extra[@]}"}
    else
        echo; echo "benchmarks/graph_scale.py is not in this checkout: graphs on the GPU not run"
    fi
fi

echo
echo "uptime: $(uptime)"
echo "gpu_check: $(( $(date +%s) - started ))s in all; cuda available: $has_cuda"
if [ ${#failures[@]} -gt 0 ]; then
    printf 'gpu_check FAILED: %s\n' "${failures[@]}"
    exit 1
fi
echo "gpu_check: every part that ran passed"
