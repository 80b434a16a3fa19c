#!/usr/bin/env bash
# The GPU check, one script of about 8 minutes on one GPU (run it whenever a GPU is lent; paste its output in the note):
#   1. the GPU tests (pytest -m gpu: CUDA extraction, bf16/fp16 autocast, the torch heads on CUDA);
#   2. extraction throughput of ResNet-50 and ViT-B/16 at bf16 with 16 decode workers, with the stage that bounds
#      the run (benchmarks/throughput.py; random weights: the machine has no model hub, and speed does not depend on
#      the weights);
#   3. the probe (torch-logreg, --device cuda) and exact kNN (--device cuda) on a 1M-row synthetic float16 store, with a
#      fixed --max-memory (benchmarks/scale.py's steps).
# Usage: bash benchmarks/gpu_check.sh [OUT_DIR]   (writes OUT_DIR/gpu_check.log and the benchmarks' JSON)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-data/benchmarks/gpu}}
mkdir -p "$OUT"
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1
log() { echo "== $(date +%T) $*" | tee -a "$OUT/gpu_check.log"; }
step() { local limit=$1; shift; log "$*"; timeout "$limit" "$@" 2>&1 | tee -a "$OUT/gpu_check.log"; log "exit ${PIPESTATUS[0]}"; }
: >"$OUT/gpu_check.log"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$OUT/gpu_check.log"
"$PY" - <<'PY' 2>&1 | tee -a "$OUT/gpu_check.log"
import importlib
for name in ("torch", "torchvision", "timm", "faiss", "h5py", "sklearn", "prefect"):
    try:
        m = importlib.import_module(name)
        print(f"{name} {getattr(m, '__version__', '?')}")
    except Exception as exc:  # noqa: BLE001 - a report of what is there
        print(f"{name} MISSING ({exc})")
import torch
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")
PY
# only the modules that hold GPU tests: the GPU machine's image has no Prefect, which other modules import
step 90 "$PY" -m pytest -q -m gpu -p no:cacheprovider $(grep -l "mark.gpu" tests/test_*.py)
for model in torchvision:resnet50 torchvision:vit_b_16; do
  step 110 "$PY" benchmarks/throughput.py --backbone "$model" --random-init --device cuda --precision bf16 \
    --workers 16 --batch-size 64 --images 2048 --kind photos --out "$OUT/throughput_${model#torchvision:}.json"
done
W="$OUT/scale"
mkdir -p "$W"
step 45 "$PY" -m pipeline.store.synthetic --rows 1000000 --dim 128 --out "$W/s1m.h5"
step 80 "$PY" -m pipeline probe --store "$W/s1m.h5" --head torch-logreg --grid 1,10 --device cuda \
  --max-memory 4GiB --resamples 0 --no-report --overwrite --out "$OUT/probe_1m.json"
step 120 "$PY" -m pipeline knn --store "$W/s1m.h5" --k 20 --device cuda --max-memory 4GiB --resamples 0 --no-report \
  --overwrite --out "$OUT/knn_1m.json"
rm -rf "$W"
log done
